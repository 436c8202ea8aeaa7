"""The OpenAPI description of our routes, merged into BentoML's /docs.json.

BentoML documents only its own APIs and mounted FastAPI apps; /embed, /embed_base64, /search and
/model are plain Starlette routes (serving/service.py says why), so its document lists the probes
alone. `openapi_document` adds our paths, written here by hand from serving/requests.py,
serving/search.py and serving/limits.py, so that clients and schemathesis see the real contract:
every status a route can answer, the JSON error body, Retry-After on 503, the response formats
(serving/responses.py: JSON floats, base64 JSON, .npy; 406 for others), and the bearer token only
when one is configured. Count limits are stated in descriptions, not as maxItems: going over them is
answered 413, which a schema bound would wrongly promise to be a 400/422.
"""

from __future__ import annotations

import copy
from typing import Any

from pipeline.embed.search import DEFAULT_K, MAX_K
from serving.responses import DTYPES, ENCODINGS, JSON, NPY
from serving.settings import Settings
from serving.thumbnails import DEFAULT_SIZE as DEFAULT_THUMBNAIL_SIZE
from serving.thumbnails import SIZES as THUMBNAIL_SIZES


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response = {"description": description, "content": {JSON: {"schema": ref("Error")}}}
    return {**response, "headers": headers} if headers else response


RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
ERRORS = {
    "400": error("An image is not a decodable image, or the body (multipart, JSON, base64) or the Accept header "
                 "is malformed. Headers are checked before anything is queued; where JPEGs are decoded in the "
                 "encoder (BARLOW_DECODE=encoder, or auto on a GPU) a JPEG whose data is corrupt is found there, "
                 "and fails its own request only"),
    "408": error("The request body did not arrive within BARLOW_BODY_TIMEOUT_S"),
    "413": error("Body larger than BARLOW_MAX_BODY_MB, more than BARLOW_MAX_IMAGES images, or an image larger "
                 "than BARLOW_MAX_PIXELS"),
    "422": error("Well-formed but wrong fields or values (no images, unknown field, bad option, an option "
                 "given both as a form field and a query parameter)"),
    "503": error("At capacity (BARLOW_MAX_INFLIGHT_IMAGES) or the encoder is overloaded or restarting; retry",
                 RETRY_AFTER),
    "504": error("Not answered within the request timeout (60 s)"),
}
MULTIPART_ERRORS = {**ERRORS, "415": error("Not multipart/form-data")}
NOT_ACCEPTABLE = {"406": error(f"The Accept header allows neither {JSON} nor {NPY} (a dtype parameter on the "
                               "media type counts as another type: use ?dtype=)")}
BOOLEAN = {"type": "boolean", "description": "true/false (also 1/0, yes/no, on/off), default true"}
RESPONSE_PARAMETERS = [
    {"name": "encoding", "in": "query", "required": False, "schema": {"type": "string", "enum": list(ENCODINGS),
                                                                       "default": "floats"},
     "description": "JSON responses: `floats` (embeddings as numbers) or `base64` (embeddings_base64: the "
                    "little-endian [N, D] array's bytes, row-major). Not with Accept: application/x-npy (422)."},
    {"name": "dtype", "in": "query", "required": False, "schema": {"type": "string", "enum": list(DTYPES),
                                                                    "default": "float32"},
     "description": "Element type of an application/x-npy or encoding=base64 response; float16 needs one of "
                    "them (422 with JSON floats) and a value beyond float16's range is a 422."},
]
EMBEDDED_HEADERS = {
    "X-Barlow-Model": {"description": "the model's name (percent-encoded if not printable ASCII)",
                       "schema": {"type": "string"}},
    "X-Barlow-Dim": {"description": "D, the embedding dimension", "schema": {"type": "integer"}},
}


def images_field(settings: Settings) -> dict[str, Any]:
    return {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"},
            "description": f"One file part per image (JPEG, PNG, WebP, GIF, BMP or TIFF), at most "
                           f"{settings.max_images} (more: 413)"}


def multipart_body(settings: Settings, option: str, option_schema: dict[str, Any]) -> dict[str, Any]:
    schema = {"type": "object", "required": ["images"], "additionalProperties": False,
              "properties": {"images": images_field(settings), option: option_schema}}
    return {"required": True, "content": {"multipart/form-data": {
        "schema": schema, "encoding": {"images": {"contentType": "application/octet-stream"}}}}}


def operation(summary: str, body: dict[str, Any] | None, ok: dict[str, Any], errors: dict[str, Any],
              settings: Settings, parameters: list[dict[str, Any]] = ()) -> dict[str, Any]:
    responses = {"200": ok, **errors}
    result: dict[str, Any] = {"summary": summary, "tags": ["Service APIs"], "responses": responses}
    if parameters:
        result["parameters"] = list(parameters)
    if body:
        result["requestBody"] = body
    if settings.api_token:
        result["security"] = [{"bearer": []}]
        responses["401"] = error("Missing or wrong bearer token")
    return result


def paths(settings: Settings) -> dict[str, Any]:
    k_schema = {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": DEFAULT_K}
    ok = {"description": "Embeddings in request order. JSON by default (also for Accept: */*): floats, or with "
                         "?encoding=base64 the packed array; Accept: application/x-npy: a .npy file of float32 "
                         "(or ?dtype=float16) [N, D], read with numpy.load(io.BytesIO(body)).",
          "headers": EMBEDDED_HEADERS,
          "content": {JSON: {"schema": {"oneOf": [ref("Embeddings"), ref("EmbeddingsBase64")]}},
                      NPY: {"schema": {"type": "string", "format": "binary"}}}}
    found = {"description": "Nearest indexed images of each image, best first",
             "content": {JSON: {"schema": ref("SearchResults")}}}
    return {
        "/embed": {"post": operation(
            "Embed uploaded images", multipart_body(settings, "normalize", BOOLEAN), ok,
            {**MULTIPART_ERRORS, **NOT_ACCEPTABLE}, settings,
            [{"name": "normalize", "in": "query", "required": False, "schema": BOOLEAN}, *RESPONSE_PARAMETERS])},
        "/embed_base64": {"post": operation(
            "Embed base64-encoded images", {"required": True, "content": {JSON: {"schema": {
                "type": "object", "required": ["images"], "additionalProperties": False, "properties": {
                    "images": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "byte"},
                               "description": "base64 (standard or URL-safe, data: URLs accepted) of image files, "
                                              f"at most {settings.max_images} (more: 413)"},
                    "normalize": BOOLEAN}}}}}, ok, {**ERRORS, **NOT_ACCEPTABLE}, settings, RESPONSE_PARAMETERS)},
        "/search": {"post": operation(
            "Nearest indexed images of uploaded images, or of an indexed key",
            {**multipart_body(settings, "k", k_schema), "required": False}, found,
            {**MULTIPART_ERRORS, "404": error("No index configured (BARLOW_INDEX_DIR), or ?key= not in it")}, settings,
            [{"name": "k", "in": "query", "required": False, "schema": k_schema},
             {"name": "key", "in": "query", "required": False, "schema": {"type": "string", "minLength": 1},
              "description": "instead of images (send no body): the neighbours of this indexed key, itself left out"}])},
        "/thumbnail/{key}": {"get": operation(
            "A small JPEG of an indexed image, read from its source", None,
            {"description": "JPEG, at most `size` px on the longer side",
             "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}},
            {"404": error("No index configured, a key not in it, or its image unreadable at its source"),
             "422": error(f"size is not an integer from {THUMBNAIL_SIZES.start} to {THUMBNAIL_SIZES.stop - 1}")},
            settings,
            [{"name": "key", "in": "path", "required": True, "schema": {"type": "string"}},
             {"name": "size", "in": "query", "required": False, "schema": {
                 "type": "integer", "minimum": THUMBNAIL_SIZES.start, "maximum": THUMBNAIL_SIZES.stop - 1,
                 "default": DEFAULT_THUMBNAIL_SIZE}}])},
        "/model": {"get": {"summary": "The served model's model.json and what runs it", "tags": ["Service APIs"],
                           "responses": {"200": {"description": "model.json plus `runtime`",
                                                 "content": {JSON: {"schema": ref("ModelInfo")}}}}}},
    }


SCHEMAS = {
    "Error": {"type": "object", "required": ["error"], "properties": {
        "error": {"type": "string", "description": "one sentence"},
        "reason": {"type": "string", "description": "a short code (e.g. too_many_images, unauthorized, "
                   "in_flight_limit), the label of barlow_rejected_inputs_total / barlow_shed_requests_total"},
        "index": {"type": "integer", "nullable": True, "description": "the image at fault, when one is"}}},
    "Embeddings": {"type": "object", "required": ["model", "dim", "embeddings"], "additionalProperties": False,
                   "properties": {"model": {"type": "string"}, "dim": {"type": "integer"},
                                  "embeddings": {"type": "array", "items": {"type": "array",
                                                                            "items": {"type": "number"}}}}},
    "SearchResults": {"type": "object", "required": ["model", "k", "results"], "properties": {
        "model": {"type": "string"}, "k": {"type": "integer"},
        "results": {"type": "array", "items": {"type": "object", "required": ["neighbours"], "properties": {
            "neighbours": {"type": "array", "items": {"type": "object", "required": ["key", "score"], "properties": {
                "key": {"type": "string"}, "source": {"type": "string", "nullable": True},
                "label": {"type": "integer", "nullable": True}, "score": {"type": "number"}}}}}}}}},
    "EmbeddingsBase64": {
        "type": "object", "required": ["model", "dim", "dtype", "shape", "embeddings_base64"],
        "additionalProperties": False, "properties": {
            "model": {"type": "string"}, "dim": {"type": "integer"},
            "dtype": {"type": "string", "enum": list(DTYPES)},
            "shape": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2,
                      "description": "[N, D]"},
            "embeddings_base64": {"type": "string", "format": "byte",
                                  "description": "the little-endian array's bytes, row-major, base64"}}},
    "ModelInfo": {"type": "object", "required": ["name", "dim", "image_size", "runtime"], "properties": {
        "name": {"type": "string"}, "dim": {"type": "integer"}, "image_size": {"type": "integer"},
        "precision": {"type": "string", "description": "absent: fp32"},
        "version": {"type": "string", "description": "the MODEL_DIR version this server resolved at start"},
        "onnx_sha256": {"type": "string", "description": "sha256 of the version's model.onnx"},
        "runtime": {"type": "object", "nullable": True,
                    "description": "what runs the model; null until the service is ready",
                    "required": ["provider", "providers", "device", "precision"], "properties": {
                        "provider": {"type": "string", "description": "the active ONNX Runtime provider"},
                        "providers": {"type": "array", "items": {"type": "string"}},
                        "device": {"type": "string", "enum": ["cpu", "cuda", "tensorrt"]},
                        "requested_device": {"type": "string", "description": "BARLOW_DEVICE"},
                        "precision": {"type": "string", "enum": ["fp32", "fp16"]},
                        "version": {"type": "string", "nullable": True},
                        "file": {"type": "string", "description": "model.onnx or model-fp16.onnx: the file loaded"},
                        "sha256": {"type": "string", "description": "sha256 of the file loaded"},
                        "encoder": {"type": "string", "enum": ["worker", "process"],
                                    "description": "BARLOW_ENCODER: in each HTTP worker, or in its own process"},
                        "sessions": {"type": "integer", "description": "ONNX Runtime sessions per HTTP worker "
                                     "(worker) or in the encoder process (process)"},
                        "threads": {"type": "integer", "description": "intra-op threads of each session"}}}}},
}
PROBES = {  # what BentoML's probes answer besides its documented 200
    "/readyz": {"503": {"description": "Not ready: warming up, or the encoder is restarting",
                        "content": {"text/plain": {"schema": {"type": "string"}}}}},
    "/metrics": {"200": {"description": "Prometheus text format",
                         "content": {"text/plain": {"schema": {"type": "string"}}}}},
}


def openapi_document(bentoml_spec: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """BentoML's document (info, probes) with our paths, schemas and, with a token, the bearer scheme."""
    document = copy.deepcopy(bentoml_spec)
    document["info"]["description"] = ("Barlow Twins image embeddings: POST /embed (multipart), /embed_base64 "
                                       "(JSON), /search (nearest indexed images); GET /model, /thumbnail/{key}; the search page "
                                       "at /.")
    for path, responses in PROBES.items():
        if path in document.get("paths", {}):
            document["paths"][path]["get"]["responses"].update(copy.deepcopy(responses))
    document.setdefault("paths", {}).update(paths(settings))
    components = document.setdefault("components", {})
    components.setdefault("schemas", {}).update(copy.deepcopy(SCHEMAS))
    if settings.api_token:
        components.setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    return document
