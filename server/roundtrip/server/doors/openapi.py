"""The OpenAPI document of the V2 REST routes, served at ``GET /v2/docs/dataplane.json``
(MLServer's path) so REST callers can generate a client; a test checks it against the
routes the worker really serves.

>>> sorted(document()["paths"])[:2]
['/v2', '/v2/docs/dataplane.json']
"""

from __future__ import annotations

from typing import Any

from roundtrip.wire.version import __version__

MODEL = "/v2/models/{model}"
VERSIONED = "/v2/models/{model}/versions/{version}"

_ERROR = {
    "description": 'the call\'s status (errors.py\'s mapping) with {"error": "<message>"}',
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}
_JSON = {"content": {"application/json": {"schema": {"type": "object"}}}}
_PARAMETERS = {
    "model": {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}},
    "version": {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}},
}


def _get(summary: str, *, not_ready: bool = False) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": {"description": summary, **_JSON}, "default": _ERROR}
    if not_ready:
        responses["503"] = {"description": "not ready (warming up or draining)", **_JSON}
    return {"get": {"summary": summary, "responses": responses}}


def _model_routes(prefix: str) -> dict[str, dict[str, Any]]:
    parameters = [_PARAMETERS["model"]] + (
        [_PARAMETERS["version"]] if "{version}" in prefix else []
    )
    routes = {
        prefix: _get("model metadata: the tensors, their datatypes and shapes"),
        prefix + "/ready": _get("whether the model takes inference calls now", not_ready=True),
        prefix + "/config": _get("Triton's model configuration extension"),
        prefix + "/stats": _get("Triton's statistics extension, from the worker's counters"),
        prefix + "/infer": {
            "post": {
                "summary": "one inference call: B requests, each answered as if sent alone",
                "requestBody": {
                    "required": True,
                    "description": "JSON; or, as application/octet-stream, JSON then binary "
                    "tensor data, the JSON's length in the Inference-Header-Content-Length "
                    "header",
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/InferenceRequest"}
                        },
                        "application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"},
                        },
                    },
                },
                "responses": {
                    "200": {
                        "description": "the outputs",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/InferenceResponse"}
                            },
                            "application/octet-stream": {
                                "schema": {"type": "string", "format": "binary"}
                            },
                        },
                    },
                    "default": _ERROR,
                },
            }
        },
    }
    for route in routes.values():
        for operation in route.values():
            operation["parameters"] = parameters
    return routes


def document() -> dict[str, Any]:
    """The whole document (OpenAPI 3.0)."""
    tensor = {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "parameters": {"type": "object"},
            "data": {"type": "array", "items": {}},
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "roundtrip V2 (Open Inference Protocol) REST", "version": __version__},
        "paths": {
            "/v2/health/live": _get("the process answers"),
            "/v2/health/ready": _get("the worker takes inference calls now", not_ready=True),
            "/v2": _get("server metadata: name, version, extensions"),
            "/v2/models/stats": _get("Triton's statistics extension, every model"),
            "/v2/docs/dataplane.json": _get("this document"),
            **_model_routes(MODEL),
            **_model_routes(VERSIONED),
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}},
                },
                "Tensor": tensor,
                "InferenceRequest": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/Tensor"},
                        },
                        "outputs": {"type": "array", "items": {"type": "object"}},
                    },
                },
                "InferenceResponse": {
                    "type": "object",
                    "properties": {
                        "model_name": {"type": "string"},
                        "model_version": {"type": "string"},
                        "id": {"type": "string"},
                        "outputs": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/Tensor"},
                        },
                    },
                },
            }
        },
    }
