"""The OpenAPI 3.1 document of the local HTTP endpoint (served at ``/openapi.json``).

Written by hand for the routes; the detections schema comes from the protocol's own
message type, so the document cannot drift from what the endpoint answers.
"""

from __future__ import annotations

from typing import Any

import msgspec

from agent import __version__
from protocol import Detections
from protocol.limits import ID_PATTERN, MODEL_REF_PATTERN

ROUTES: dict[str, tuple[str, ...]] = {
    "/detect": ("post",),
    "/models": ("get",),
    "/healthz": ("get",),
    "/readyz": ("get",),
    "/openapi.json": ("get",),
}
"""Every route and its methods (the server dispatches on this table)."""

OPEN_ROUTES = frozenset({"/healthz", "/readyz"})
"""Routes that need no bearer token (probes)."""

_JSON = "application/json"
_BEARER = {
    "type": "http",
    "scheme": "bearer",
    "description": "the [http] token (or token_file) of the agent config",
}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {_JSON: {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if headers:
        answer["headers"] = headers
    return answer


def _schemas() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        [Detections], ref_template="#/components/schemas/{name}"
    )
    return {
        **components,
        "Error": {
            "type": "object",
            "properties": {
                "detail": {"type": "string", "description": "what is wrong and what to do"}
            },
            "required": ["detail"],
        },
        "Model": {
            "type": "object",
            "properties": {
                "model": {"type": "string", "description": "name@version"},
                "name": {"type": "string"},
                "version": {"type": "string"},
                "backend": {"type": "string"},
                "streams": {"type": "array", "items": {"type": "string"}},
                "labels": {"type": "array", "items": {"type": "string"}},
                "input": {
                    "type": "object",
                    "properties": {"width": {"type": "integer"}, "height": {"type": "integer"}},
                    "required": ["width", "height"],
                },
            },
            "required": ["model", "name", "version", "backend", "streams", "labels", "input"],
        },
        "Models": {
            "type": "object",
            "properties": {
                "models": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}}
            },
            "required": ["models"],
        },
        "Health": {
            "type": "object",
            "properties": {
                "status": {"type": "string", "enum": ["ok", "ready"]},
                "models": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["status"],
        },
    }


def _detect(token: bool) -> dict[str, Any]:
    image = {"schema": {"type": "string", "contentMediaType": "image/jpeg"}}
    return {
        "post": {
            "operationId": "detect",
            "summary": "Detect objects in one image",
            "description": (
                "The body is a JPEG or PNG image with its Content-Type. The answer has the "
                "shape of the MQTT detections message; `seq` and `frame_index` count HTTP "
                "requests (separate from the MQTT sequence), `frame_ts` is when the request "
                "arrived. Without `stream` and `model`, the device's only stream is used."
            ),
            "parameters": [
                {
                    "name": "stream",
                    "in": "query",
                    "required": False,
                    "description": "run the model this stream runs now, with its min_score and label filter",
                    "schema": {"type": "string", "pattern": ID_PATTERN},
                },
                {
                    "name": "model",
                    "in": "query",
                    "required": False,
                    "description": "name@version of a model a stream runs now (GET /models)",
                    "schema": {"type": "string", "pattern": MODEL_REF_PATTERN},
                },
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "image/jpeg": image,
                    "image/png": {"schema": {"type": "string", "contentMediaType": "image/png"}},
                },
            },
            "responses": {
                "200": {
                    "description": "the detections",
                    "content": {_JSON: {"schema": {"$ref": "#/components/schemas/Detections"}}},
                },
                "400": _error("undecodable image, or a bad query"),
                **({"401": _error("missing or wrong bearer token")} if token else {}),
                "404": _error("unknown stream or model"),
                "408": _error("the body did not arrive in time"),
                "411": _error("no Content-Length"),
                "413": _error("body larger than max_body_bytes"),
                "415": _error("Content-Type is not image/jpeg or image/png"),
                "503": _error(
                    "the queue is full (or the model cannot be loaded): retry later",
                    {
                        "Retry-After": {
                            "description": "seconds to wait",
                            "schema": {"type": "integer"},
                        }
                    },
                ),
                "504": _error("inference did not finish in time"),
            },
        }
    }


def _get(op: str, summary: str, schema: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "get": {
            "operationId": op,
            "summary": summary,
            "responses": {
                "200": {
                    "description": summary,
                    "content": {_JSON: {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
                },
                **extra,
            },
        }
    }


def openapi_document(*, token: bool) -> dict[str, Any]:
    """The OpenAPI 3.1 document (a fresh dict); ``token``: a bearer token is configured."""
    unauthorized = {"401": _error("missing or wrong bearer token")} if token else {}
    paths = {
        "/detect": _detect(token),
        "/models": _get("models", "The models the streams run now", "Models", unauthorized),
        "/healthz": _get("healthz", "The process answers", "Health", {}),
        "/readyz": _get(
            "readyz",
            "A stream runs a model, so /detect can answer",
            "Health",
            {"503": _error("no stream runs a model yet")},
        ),
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {_JSON: {"schema": {"type": "object"}}},
                    },
                    **unauthorized,
                },
            }
        },
    }
    for path, methods in ROUTES.items():
        assert set(paths[path]) == set(methods), path
        if token and path not in OPEN_ROUTES:
            for op in paths[path].values():
                op["security"] = [{"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "edgefleet agent: local inference",
            "version": __version__,
            "description": "Detections for one image from the models the device runs (docs/http.md).",
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            **({"securitySchemes": {"bearer": _BEARER}} if token else {}),
        },
    }
