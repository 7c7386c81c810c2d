"""The gateway's OpenAPI 3.1 document (served at /openapi.json) and the request validators built
from the same schemas, so what the document promises is what the gateway enforces.

Request schemas name only what the gateway itself needs to route, filter and count, and allow
every other field (vLLM's extensions pass through; vLLM validates them and answers 400 itself).
Validation uses fastjsonschema's compiled validators (a few microseconds per request).
"""

from __future__ import annotations

import fastjsonschema

_TEXT_PARTS = {"type": "array", "items": {"type": "object"}}
MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
    "content": {"anyOf": [{"type": "string"}, _TEXT_PARTS, {"type": "null"}]},
}}
_COMMON = {
    "model": {"type": "string", "minLength": 1},
    "stream": {"type": ["boolean", "null"]},
    "stream_options": {"type": ["object", "null"],
                       "properties": {"include_usage": {"type": ["boolean", "null"]}}},
    "max_tokens": {"type": ["integer", "null"], "minimum": 1},
    "n": {"type": ["integer", "null"], "minimum": 1, "maximum": 128},
    "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
}
_PROMPT = {"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {
    "anyOf": [{"type": "string"}, {"type": "integer", "minimum": 0}]}}]}

REQUESTS = {
    "/v1/chat/completions": {"type": "object", "required": ["model", "messages"], "properties": {
        **_COMMON, "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1},
        "messages": {"type": "array", "minItems": 1, "items": MESSAGE}}},
    "/v1/completions": {"type": "object", "required": ["model", "prompt"], "properties": {
        **_COMMON, "prompt": _PROMPT}},
    "/v1/embeddings": {"type": "object", "required": ["model", "input"], "properties": {
        "model": _COMMON["model"], "input": _PROMPT,
        "encoding_format": {"type": "string", "enum": ["float", "base64"]}}},
}

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def compile_validators() -> dict[str, callable]:
    return {path: fastjsonschema.compile(schema) for path, schema in REQUESTS.items()}


def _error_responses(*codes: int) -> dict:
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    text = {400: "Bad JSON or a field of the wrong type", 401: "Missing or unknown API key",
            403: "Output blocked by the filter, or a key of the wrong role (metrics or client)",
            404: "Unknown model or path",
            413: "Body or headers too large", 429: "Rate limited (see Retry-After)",
            502: "Upstream broke the connection or sent an unreadable reply",
            503: "Upstream unavailable, or the audit log cannot be written (audit.fail_closed)",
            504: "Upstream timed out"}
    return {str(c): {"description": text[c], "content": ref} for c in codes}


def document(models: list[str]) -> dict:
    """The OpenAPI document; ``model`` lists the routed models so clients (and fuzzers) see them."""
    proxied = (400, 401, 403, 404, 413, 429, 502, 503, 504)
    paths = {}
    for path, schema in REQUESTS.items():
        schema = {**schema, "properties": {**schema["properties"],
                                           "model": {"type": "string", "enum": models or ["none"]}}}
        ok = {"application/json": {"schema": {"type": "object"}}}
        if path != "/v1/embeddings":
            ok["text/event-stream"] = {"schema": {"type": "string"}}
        paths[path] = {"post": {
            "operationId": path.strip("/").replace("/", "_"),
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": {"200": {"description": "Upstream reply (SSE when stream is true)",
                                  "content": ok}, **_error_responses(*proxied)}}}
    paths["/v1/models"] = {"get": {"operationId": "v1_models", "responses": {
        "200": {"description": "Models of every upstream, merged",
                "content": {"application/json": {"schema": {"type": "object"}}}},
        **_error_responses(401, 403, 429)}}}
    paths["/metrics"] = {"get": {"operationId": "metrics", "responses": {
        "200": {"description": "Prometheus text format (a metrics key: add-key ID --metrics)",
                "content": {"text/plain": {"schema": {"type": "string"}}}},
        **_error_responses(401, 403)}}}
    paths["/health"] = {"get": {"operationId": "health", "security": [], "responses": {
        "200": {"description": "The gateway is up", "content": {"application/json": {"schema": {"type": "object"}}}}}}}
    paths["/ready"] = {"get": {"operationId": "ready", "security": [], "responses": {
        "200": {"description": "Ready: audit rows are being written",
                "content": {"application/json": {"schema": {"type": "object"}}}},
        "503": {"description": "Not ready, with the reason (e.g. the audit log cannot be written)",
                "content": {"application/json": {"schema": {"type": "object"}}}}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "LLM Workbench gateway", "version": "1"},
        "security": [{"bearer": []}],
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
                       "schemas": {"Error": ERROR}},
        "paths": paths,
    }
