"""serving/requests.py without a server: starlette Requests built from an ASGI scope and a `receive`
callable, multipart bodies encoded by httpx. Assertions are on status, reason and index (what clients
and metrics see), not on the wording of the sentences.
"""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import numpy as np
import pytest
from starlette.requests import Request

from serving.requests import (EmbedRequest, RequestError, check_body_size, check_token, decode_base64, header_pixels,
                              parse_base64_json, parse_bool, parse_multipart, preprocess_all, read_body)

MAX_IMAGES = 4


def make_request(body: bytes | list[bytes] = b"", headers: dict[str, str] | None = None, query: str = "",
                 method: str = "POST", path: str = "/embed") -> Request:
    """A starlette Request whose body arrives as `body` (a list: one ASGI message per chunk)."""
    chunks = body if isinstance(body, list) else [body]
    messages = [{"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
                for i, chunk in enumerate(chunks)]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    scope = {"type": "http", "http_version": "1.1", "method": method, "scheme": "http", "path": path,
             "raw_path": path.encode(), "root_path": "", "query_string": query.encode(),
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()],
             "client": ("127.0.0.1", 1234), "server": ("testserver", 80)}
    return Request(scope, receive)


def multipart_request(files=None, data=None, query: str = "") -> Request:
    """What `httpx.post(url, files=..., data=...)` sends, as a starlette Request."""
    encoded = httpx.Request("POST", "http://testserver/embed", files=files, data=data)
    body = encoded.read()
    headers = {"content-type": encoded.headers["content-type"], "content-length": str(len(body))}
    return make_request(body, headers, query)


def expect(caught: pytest.ExceptionInfo, status: int, reason: str, index: int | None = None) -> RequestError:
    error = caught.value
    assert (error.status, error.reason, error.index) == (status, reason, index), error.message
    assert error.message and "\n" not in error.message
    return error


def run(coroutine):
    return asyncio.run(coroutine)


# ---------------------------------------------------------------- token and body size


def test_check_token_without_a_configured_token_lets_everything_through():
    check_token(make_request(), "")
    check_token(make_request(headers={"Authorization": "Bearer anything"}), "")


@pytest.mark.parametrize("authorization", [None, "", "Bearer", "Bearer ", "Basic s3cret", "Token s3cret",
                                           "Bearer wrong", "Bearer s3cret-but-longer", "s3cret"])
def test_check_token_refuses_missing_wrong_scheme_and_wrong_token(authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    with pytest.raises(RequestError) as caught:
        check_token(make_request(headers=headers), "s3cret")
    error = expect(caught, 401, "unauthorized")
    assert error.headers == {"WWW-Authenticate": "Bearer"}
    response = error.response()
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert set(json.loads(response.body)) == {"error", "reason", "index"} and json.loads(response.body)["index"] is None


@pytest.mark.parametrize("authorization", ["Bearer s3cret", "bearer s3cret", "BEARER s3cret", "Bearer s3cret "])
def test_check_token_accepts_the_right_bearer_token(authorization):
    check_token(make_request(headers={"Authorization": authorization}), "s3cret")


def test_other_errors_carry_no_www_authenticate_but_their_own_headers():
    assert RequestError(413, "too_many_images", "x").headers == {}
    error = RequestError(503, "overloaded", "retry", headers={"Retry-After": "1"})
    assert error.response().headers["retry-after"] == "1"


def test_check_body_size_refuses_a_declared_length_above_the_limit():
    limit = 2 * 2**20
    check_body_size(make_request(headers={"Content-Length": str(limit)}), limit)  # at the limit: fine
    check_body_size(make_request(), limit)  # no Content-Length: read_body guards the stream
    check_body_size(make_request(headers={"Content-Length": "chunked"}), limit)  # not a number: read_body again
    with pytest.raises(RequestError) as caught:
        check_body_size(make_request(headers={"Content-Length": str(limit + 1)}), limit)
    expect(caught, 413, "body_too_large")


def test_read_body_joins_chunks_and_refuses_more_than_max_bytes_without_content_length():
    chunks = [b"a" * 400, b"b" * 400, b"c" * 200]
    assert run(read_body(make_request(list(chunks)), 1000)) == b"".join(chunks)
    with pytest.raises(RequestError) as caught:
        run(read_body(make_request(chunks + [b"d"]), 1000))  # no Content-Length header at all
    expect(caught, 413, "body_too_large")


# ---------------------------------------------------------------- parse_bool, decode_base64


@pytest.mark.parametrize("value", [True, "true", "True", "TRUE", " true ", "1", "yes", "on", "On"])
def test_parse_bool_true_spellings(value):
    assert parse_bool(value) is True


@pytest.mark.parametrize("value", [False, "false", "FALSE", "0", "no", "off", " Off\n"])
def test_parse_bool_false_spellings(value):
    assert parse_bool(value) is False


@pytest.mark.parametrize("value", ["maybe", "", "2", "truthy", 1, 0, None, [], {"a": 1}])
def test_parse_bool_refuses_other_values_with_422(value):
    with pytest.raises(RequestError) as caught:
        parse_bool(value, field="normalize")
    error = expect(caught, 422, "bad_field")
    assert "normalize" in error.message


def test_parse_bool_names_the_field_it_checks():
    with pytest.raises(RequestError) as caught:
        parse_bool("maybe", field="pad")
    assert "pad" in caught.value.message


def test_decode_base64_standard_url_safe_data_url_and_mime_newlines(image_bytes):
    data = image_bytes(1, "PNG")
    assert decode_base64(base64.b64encode(data).decode(), 0) == data
    assert decode_base64(f"data:image/png;base64,{base64.b64encode(data).decode()}", 0) == data
    assert decode_base64(base64.encodebytes(data).decode(), 0) == data  # newline every 76 characters
    assert decode_base64(" " + base64.b64encode(data).decode() + "\r\n", 0) == data
    awkward = b"\xfb\xff\xbf" * 5  # standard alphabet "+/+/...", URL-safe "-_-_..."
    assert "+" in base64.b64encode(awkward).decode() and "-" in base64.urlsafe_b64encode(awkward).decode()
    assert decode_base64(base64.b64encode(awkward).decode(), 0) == awkward
    assert decode_base64(base64.urlsafe_b64encode(awkward).decode(), 0) == awkward
    assert decode_base64("data:;base64," + base64.urlsafe_b64encode(awkward).decode(), 0) == awkward


@pytest.mark.parametrize("item", [7, None, 1.5, ["aGk="], {"data": "aGk="}, b"aGk="])
def test_decode_base64_refuses_a_non_string_with_422_and_its_index(item):
    with pytest.raises(RequestError) as caught:
        decode_base64(item, 3)
    expect(caught, 422, "bad_field", 3)


@pytest.mark.parametrize("item", ["not*base64!", "aGk", "a", "%%%%", "aGk=aGk=x", "data:image/png;base64,@@@@"])
def test_decode_base64_refuses_garbage_with_400_and_its_index(item):
    with pytest.raises(RequestError) as caught:
        decode_base64(item, 2)
    expect(caught, 400, "bad_base64", 2)


# ---------------------------------------------------------------- /embed_base64 bodies


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_parse_base64_json_decodes_images_and_normalize(image_bytes):
    png, jpeg = image_bytes(1, "PNG"), image_bytes(2, "JPEG")
    parsed = parse_base64_json(json.dumps({"images": [b64(png), b64(jpeg)]}).encode(), MAX_IMAGES)
    assert parsed == EmbedRequest([png, jpeg], True)  # normalize defaults to true
    parsed = parse_base64_json(json.dumps({"images": [b64(png)], "normalize": "off"}).encode(), MAX_IMAGES)
    assert parsed.images == [png] and parsed.normalize is False


@pytest.mark.parametrize("body", [b"{images: nope", b"", b"\xff\xfe\x00garbage", b'{"images": [', b"nul\x00l"])
def test_parse_base64_json_refuses_bad_json_with_400(body):
    with pytest.raises(RequestError) as caught:
        parse_base64_json(body, MAX_IMAGES)
    expect(caught, 400, "bad_json")


@pytest.mark.parametrize("document", [[], ["aGk="], "aGk=", 7, None, {}, {"pictures": ["aGk="]}, {"images": "aGk="},
                                      {"images": {"0": "aGk="}}, {"images": None}])
def test_parse_base64_json_refuses_anything_but_an_object_with_an_images_list(document):
    with pytest.raises(RequestError) as caught:
        parse_base64_json(json.dumps(document).encode(), MAX_IMAGES)
    expect(caught, 422, "bad_field")


def test_parse_base64_json_refuses_unknown_fields_empty_lists_and_bad_values(image_bytes):
    good = b64(image_bytes(1, "PNG"))
    for document, reason, index in (
        ({"images": [good], "normalise": True}, "bad_field", None),  # a misspelt option is not ignored
        ({"images": [good], "k": 3}, "bad_field", None),
        ({"images": []}, "no_images", None),
        ({"images": [good], "normalize": "maybe"}, "bad_field", None),
        ({"images": [good, 7, good]}, "bad_field", 1),
    ):
        with pytest.raises(RequestError) as caught:
            parse_base64_json(json.dumps(document).encode(), MAX_IMAGES)
        expect(caught, 422, reason, index)


def test_parse_base64_json_counts_images_before_decoding_any():
    for count in (MAX_IMAGES + 1, 10 * MAX_IMAGES):
        with pytest.raises(RequestError) as caught:  # garbage items: the count is checked first
            parse_base64_json(json.dumps({"images": ["@@@"] * count}).encode(), MAX_IMAGES)
        expect(caught, 413, "too_many_images")


def test_parse_base64_json_reports_the_first_bad_item():
    with pytest.raises(RequestError) as caught:
        parse_base64_json(json.dumps({"images": ["aGk=", "not*base64", 7]}).encode(), MAX_IMAGES)
    expect(caught, 400, "bad_base64", 1)


# ---------------------------------------------------------------- /embed multipart bodies


def test_parse_multipart_reads_image_parts_in_order_and_normalize(image_bytes):
    png, jpeg = image_bytes(1, "PNG"), image_bytes(2, "JPEG")
    files = [("images", ("a.png", png, "image/png")), ("images", ("b.jpg", jpeg, "application/octet-stream"))]
    assert run(parse_multipart(multipart_request(files), MAX_IMAGES)) == EmbedRequest([png, jpeg], True)
    as_field = run(parse_multipart(multipart_request(files, data={"normalize": "false"}), MAX_IMAGES))
    assert as_field.images == [png, jpeg] and as_field.normalize is False
    as_query = run(parse_multipart(multipart_request(files, query="normalize=no"), MAX_IMAGES))
    assert as_query.normalize is False
    other_query = run(parse_multipart(multipart_request(files, query="unrelated=1"), MAX_IMAGES))
    assert other_query.normalize is True


def test_parse_multipart_accepts_exactly_max_images(image_bytes):
    files = [("images", (f"{i}.png", image_bytes(i, "PNG"))) for i in range(MAX_IMAGES)]
    assert len(run(parse_multipart(multipart_request(files), MAX_IMAGES)).images) == MAX_IMAGES


@pytest.mark.parametrize("count", [MAX_IMAGES + 1, MAX_IMAGES + 2, 5 * MAX_IMAGES])
def test_parse_multipart_refuses_too_many_images_with_413(count):
    # max+1 passes starlette's file limit and is counted by us; more is refused by the parser: both 413
    files = [("images", (f"{i}.jpg", b"x")) for i in range(count)]
    with pytest.raises(RequestError) as caught:
        run(parse_multipart(multipart_request(files), MAX_IMAGES))
    expect(caught, 413, "too_many_images")


def test_parse_multipart_refuses_normalize_both_as_field_and_query():
    files = [("images", ("a.jpg", b"x"))]
    with pytest.raises(RequestError) as caught:
        run(parse_multipart(multipart_request(files, data={"normalize": "true"}, query="normalize=true"), MAX_IMAGES))
    expect(caught, 422, "bad_field")


@pytest.mark.parametrize("case, files, data, query, reason, index", [
    ("images-as-text-field", [("images", (None, b"http://169.254.169.254/latest"))], None, "", "bad_field", 0),
    ("second-image-as-text", [("images", ("a.jpg", b"x")), ("images", (None, b"text"))], None, "", "bad_field", 1),
    ("no-images", [("normalize", (None, b"true"))], None, "", "no_images", None),
    ("wrong-field-name", [("image", ("a.jpg", b"x"))], None, "", "bad_field", None),
    ("extra-field", [("images", ("a.jpg", b"x"))], {"k": "3"}, "", "bad_field", None),
    ("normalize-as-a-file", [("images", ("a.jpg", b"x")), ("normalize", ("n.txt", b"true"))], None, "", "bad_field",
     None),
    ("bad-normalize-field", [("images", ("a.jpg", b"x"))], {"normalize": "maybe"}, "", "bad_field", None),
    ("bad-normalize-query", [("images", ("a.jpg", b"x"))], None, "normalize=maybe", "bad_field", None),
])
def test_parse_multipart_refuses_wrong_fields_with_422(case, files, data, query, reason, index):
    with pytest.raises(RequestError) as caught:
        run(parse_multipart(multipart_request(files, data=data, query=query), MAX_IMAGES))
    expect(caught, 422, reason, index)


@pytest.mark.parametrize("content_type", [None, "application/json", "application/x-www-form-urlencoded",
                                          "image/jpeg", "text/plain; charset=utf-8"])
def test_parse_multipart_refuses_other_content_types_with_415(content_type):
    headers = {"content-type": content_type} if content_type else {}
    with pytest.raises(RequestError) as caught:
        run(parse_multipart(make_request(b'{"images": []}', headers), MAX_IMAGES))
    expect(caught, 415, "bad_content_type")


@pytest.mark.parametrize("body, content_type", [
    (b"abc", "multipart/form-data; boundary=x"),
    (b"--x\r\nContent-Disposition: form-data\r\n\r\nvalue\r\n--x--\r\n", "multipart/form-data; boundary=x"),  # no name
    (b"--x\r\n\r\n", "multipart/form-data"),  # no boundary
])
def test_parse_multipart_refuses_malformed_bodies_with_400(body, content_type):
    with pytest.raises(RequestError) as caught:
        run(parse_multipart(make_request(body, {"content-type": content_type}), MAX_IMAGES))
    expect(caught, 400, "bad_multipart")


# ---------------------------------------------------------------- images


def test_header_pixels_reads_the_size_from_the_header_only(image_bytes):
    assert header_pixels(image_bytes(1, "PNG", size=(24, 20))) == 24 * 20
    assert header_pixels(image_bytes(2, "JPEG", size=(31, 7))) == 31 * 7
    png = image_bytes(3, "PNG", size=(40, 30))
    assert header_pixels(png[:100]) == 40 * 30  # a truncated file still declares its size


@pytest.mark.parametrize("data", [b"", b"not an image", b"\x89PNG\r\n\x1a\n", bytes(range(256))])
def test_header_pixels_is_0_for_unreadable_headers(data):
    assert header_pixels(data) == 0


def test_preprocess_all_gives_uint8_n_3_s_s(image_bytes):
    images = [image_bytes(1, "PNG", size=(24, 20)), image_bytes(2, "JPEG", size=(50, 64)), image_bytes(3, "WEBP")]
    arrays = preprocess_all(images, 16, 10_000)
    assert arrays.shape == (3, 3, 16, 16) and arrays.dtype == np.uint8
    assert not np.array_equal(arrays[0], arrays[1])


@pytest.mark.parametrize("bad, status, reason", [
    (b"not an image", 400, "not_an_image"),
    (b"", 400, "empty"),
    ("truncated", 400, "truncated"),
    ("too-large", 413, "too_large"),
])
def test_preprocess_all_names_the_first_bad_image(image_bytes, bad, status, reason):
    if bad == "truncated":
        jpeg = image_bytes(4, "JPEG", size=(64, 48))
        bad = jpeg[: len(jpeg) // 2]
    elif bad == "too-large":
        bad = image_bytes(5, "PNG", size=(120, 100))  # 12,000 pixels, the limit below is 10,000
    good = image_bytes(1, "PNG")
    with pytest.raises(RequestError) as caught:
        preprocess_all([good, bad, good, b"also bad"], 16, 10_000)
    error = expect(caught, status, reason, 1)
    assert "image 1" in error.message
