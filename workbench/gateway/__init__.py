"""The API gateway in front of vLLM: keys, rate limits, sensitive-word filter, moderation, audit
log and Prometheus metrics, on the OpenAI API. Its own ASGI app, reached over HTTP only; it imports
nothing of the pipeline (no vLLM, torch or lm-eval), so it starts in milliseconds anywhere.

    workbench gateway --config deploy/gateway.yaml

Modules: config (typed YAML), app (the ASGI app: routing, records), intake (headers, body,
schema, rate limits), checks (filter and moderation on the prompt), relay (replies), upstream
(client, error mapping), sse (stream relay, gzip), filter (Aho-Corasick words), moderation/
(policy registry), keys (hashed keys, token buckets), audit (SQLite writer), auditdb (the
database file: schema, prune, export), metrics and loopmetrics, openapi, server (uvicorn), cli.
"""
