"""serving/openapi.py: our routes, schemas and (with a token only) the bearer scheme merged into a
BentoML-like document, without starting BentoML."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from serving.openapi import openapi_document
from serving.settings import Settings

OUR_OPERATIONS = [("/embed", "post"), ("/embed_base64", "post"), ("/search", "post"), ("/model", "get"),
                  ("/thumbnail/{key}", "get")]
GUARDED = [("/embed", "post"), ("/embed_base64", "post"), ("/search", "post"), ("/thumbnail/{key}", "get")]


def bentoml_spec() -> dict:
    """The shape of BentoML's own document: info and the probes, nothing of ours."""
    ok = {"200": {"description": "Successful Response"}}
    return {"openapi": "3.0.2", "info": {"title": "Embedder", "version": "1.0"},
            "paths": {path: {"get": {"responses": copy.deepcopy(ok), "tags": ["Infrastructure"]}}
                      for path in ("/readyz", "/livez", "/metrics")},
            "components": {"schemas": {"InvalidArgument": {"type": "object"}}}}


@pytest.fixture(params=["", "s3cret"], ids=["no-token", "token"])
def settings(request) -> Settings:
    return Settings(model_dir=Path("x"), api_token=request.param)


def refs(node) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if "$ref" in node else []
        return own + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


def test_our_routes_and_schemas_are_added_and_bentomls_are_kept(settings):
    spec = bentoml_spec()
    original = copy.deepcopy(spec)
    document = openapi_document(spec, settings)
    assert spec == original, "the input document is not modified"
    for path, method in OUR_OPERATIONS + [("/readyz", "get"), ("/livez", "get"), ("/metrics", "get")]:
        assert method in document["paths"][path], (path, method)
    schemas = document["components"]["schemas"]
    assert {"Error", "Embeddings", "SearchResults", "ModelInfo", "InvalidArgument"} <= set(schemas)
    assert document["info"]["title"] == "Embedder" and "/embed" in document["info"]["description"]
    for ref in refs(document["paths"]):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    json.dumps(document)  # plain JSON, as /docs.json serves it


def test_every_status_a_route_answers_is_documented(settings):
    paths = openapi_document(bentoml_spec(), settings)["paths"]
    embed, b64, search = paths["/embed"]["post"], paths["/embed_base64"]["post"], paths["/search"]["post"]
    common = {"200", "400", "408", "413", "422", "503"}
    assert common | {"415"} <= set(embed["responses"])
    assert common <= set(b64["responses"]) and "415" not in b64["responses"]
    assert common | {"404", "415"} <= set(search["responses"])
    for operation in (embed, b64, search):
        assert "Retry-After" in operation["responses"]["503"]["headers"]
        assert operation["responses"]["400"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Error"}
    assert set(embed["requestBody"]["content"]) == {"multipart/form-data"}
    assert set(b64["requestBody"]["content"]) == {"application/json"}
    assert [p["name"] for p in embed["parameters"]] == ["normalize", "encoding", "dtype"]
    assert [p["name"] for p in b64["parameters"]] == ["encoding", "dtype"]
    assert "406" in embed["responses"] and "406" in b64["responses"] and "406" not in search["responses"]
    thumbnail = paths["/thumbnail/{key}"]["get"]
    assert {"200", "404", "422"} <= set(thumbnail["responses"])
    assert "image/jpeg" in thumbnail["responses"]["200"]["content"]
    assert [p["name"] for p in thumbnail["parameters"]] == ["key", "size"]
    assert [p["name"] for p in search["parameters"]] == ["k", "key"]
    assert paths["/embed"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["required"] == ["images"]
    assert set(paths["/readyz"]["get"]["responses"]) == {"200", "503"}
    assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]


def test_embedding_responses_document_json_base64_and_npy(settings):
    document = openapi_document(bentoml_spec(), settings)
    schemas = document["components"]["schemas"]
    for path in ("/embed", "/embed_base64"):
        ok = document["paths"][path]["post"]["responses"]["200"]
        assert set(ok["content"]) == {"application/json", "application/x-npy"}
        assert ok["content"]["application/json"]["schema"] == {"oneOf": [
            {"$ref": "#/components/schemas/Embeddings"}, {"$ref": "#/components/schemas/EmbeddingsBase64"}]}
        assert ok["content"]["application/x-npy"]["schema"] == {"type": "string", "format": "binary"}
        assert set(ok["headers"]) == {"X-Barlow-Model", "X-Barlow-Dim"}
        parameters = {p["name"]: p for p in document["paths"][path]["post"]["parameters"]}
        assert parameters["encoding"]["schema"]["enum"] == ["floats", "base64"]
        assert parameters["dtype"]["schema"]["enum"] == ["float32", "float16"]
    assert set(schemas["EmbeddingsBase64"]["required"]) == {"model", "dim", "dtype", "shape", "embeddings_base64"}
    runtime = schemas["ModelInfo"]["properties"]["runtime"]
    assert runtime["nullable"] and {"provider", "device", "precision"} <= set(runtime["required"])


def test_without_a_token_there_is_no_security_scheme():
    document = openapi_document(bentoml_spec(), Settings(model_dir=Path("x")))
    assert "securitySchemes" not in document["components"]
    for path, method in OUR_OPERATIONS:
        operation = document["paths"][path][method]
        assert "security" not in operation and "401" not in operation["responses"], path


def test_with_a_token_the_embedding_routes_need_the_bearer_scheme():
    document = openapi_document(bentoml_spec(), Settings(model_dir=Path("x"), api_token="s3cret"))
    assert document["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, method in GUARDED:
        operation = document["paths"][path][method]
        assert operation["security"] == [{"bearer": []}] and "401" in operation["responses"], path
    for path in ("/model", "/readyz", "/livez", "/metrics"):  # public, as the service answers them
        assert "security" not in document["paths"][path]["get"], path
    assert "s3cret" not in json.dumps(document), "the token itself is never published"


def test_a_spec_without_probes_or_components_still_gets_our_routes():
    document = openapi_document({"openapi": "3.0.2", "info": {"title": "t", "version": "1"}},
                                Settings(model_dir=Path("x"), api_token="t"))
    assert {path for path, _ in OUR_OPERATIONS} == set(document["paths"])
    assert "Error" in document["components"]["schemas"] and "bearer" in document["components"]["securitySchemes"]
