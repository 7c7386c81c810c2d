"""The gateway's typed configuration, read from a YAML file (default ``deploy/gateway.yaml``).

Precedence: CLI flags (``--host``, ``--port``) > the YAML file > the defaults below. Every model
forbids unknown keys, so a typo fails at start and names the key::

    python -c "from workbench.gateway.config import load_config; print(load_config())"

Light on purpose (pydantic + PyYAML): the gateway imports nothing of the pipeline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

CONFIG_FILE = "deploy/gateway.yaml"


class GatewayConfigError(ValueError):
    """A config file that cannot be used; the message names the offending key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UpstreamConfig(Section):
    """One OpenAI-compatible server (vLLM). Requests go here by their ``model`` field."""

    # http://host:port/v1, or a list of replicas serving the same models (a pool: least
    # outstanding requests, health-checked, ejected on failure; see workbench/gateway/pool.py)
    base_url: str | list[str] = Field(min_length=1)
    api_key: str | None = None  # sent upstream as Bearer (vLLM's --api-key); clients never see it
    models: list[str] = []  # model names served here; empty: the upstream's own name only
    # The served model's tokenizer.json (or its folder, e.g. models/base): prompts are counted
    # exactly for token limits, and token-ID prompts can be filtered. None: text is counted by an
    # upper bound (UTF-8 bytes) and token-ID prompts are refused while the prompt filter is on.
    tokenizer: str | None = None
    # Pools (base_url a list): GET <replica root>/health every health_interval_s (0: never; only
    # failed connections eject then); a replica leaves after unhealthy_after failed checks or
    # one refused connection, and returns after healthy_after passing checks in a row.
    health_interval_s: float = Field(default=2.0, ge=0)
    health_timeout_s: float = Field(default=1.0, gt=0)
    unhealthy_after: int = Field(default=2, ge=1)  # failed checks, or failed requests, in a row
    healthy_after: int = Field(default=2, ge=1)
    # An ejected replica stays out at least this x its ejections in a row (max 300 s), however
    # its checks go (Envoy's base_ejection_time): /health can pass while requests fail.
    eject_s: float = Field(default=10, ge=0)

    @property
    def urls(self) -> list[str]:
        """Every replica's base URL (one for a plain upstream), without a trailing slash."""
        urls = [self.base_url] if isinstance(self.base_url, str) else self.base_url
        return [u.rstrip("/") for u in urls]


class KeyConfig(Section):
    """One client API key, stored as the SHA-256 of the key. The keys are 256-bit random tokens
    (``workbench gateway add-key``), so a fast hash is enough: there is nothing to brute-force,
    unlike a password, and lookup costs one hash per request."""

    id: str  # key id: what metrics, audit rows and rate limits are labelled with
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # Token buckets refilled per minute, holding one minute's worth (OpenAI's RPM / TPM). None: no limit.
    requests_per_minute: float | None = Field(default=None, gt=0)
    tokens_per_minute: float | None = Field(default=None, gt=0)  # prompt + completion, from usage
    # client: the /v1 routes; metrics: /metrics only (Prometheus), so tenants cannot read it
    role: Literal["client", "metrics"] = "client"


class LimitsConfig(Section):
    max_body_bytes: int = Field(default=2 * 1024 * 1024, ge=1)  # 413 above; ~500k tokens of prompt
    # Request line + headers, counted as bytes arrive (workbench/gateway/http.py); 413 above
    max_header_bytes: int = Field(default=64 * 1024, ge=256)
    connect_timeout_s: float = Field(default=5, gt=0)  # one retry on connect errors, then 503
    # Longest silence from the upstream before 504 (or, mid-stream, a final error event).
    # Generous: a long prefill on a CPU server can take a minute before the first byte.
    read_timeout_s: float = Field(default=300, gt=0)
    max_connections: int = Field(default=1024, ge=1)  # upstream pool size, all upstreams together
    # The client that carries requests to the upstreams: "native" (workbench/gateway/client.py,
    # asyncio protocols + httptools) or "aiohttp" (the one before it; same errors, same pool).
    # results/benchmarks/gateway_cpu_round3.md compares them.
    upstream_client: Literal["native", "aiohttp"] = "native"
    # Where request and token buckets (and revoked keys) live. memory: this process only (one
    # worker, no Redis). redis: shared by every worker and gateway instance on redis_url, each
    # admission one atomic Lua script (workbench/gateway/store.py).
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "wb:gw:"  # key prefix, so several gateways can share one Redis
    redis_timeout_s: float = Field(default=0.5, gt=0)
    # Redis unreachable: refuse with 503 (false, the default: limits always hold) or admit
    # without limits (true: availability first).
    redis_fail_open: bool = False

    # Token limits reserve prompt (counted: workbench/gateway/tokens.py) + max_tokens at admission and
    # settle to the real usage at the end; this many completion tokens are reserved when a
    # request sets no max_tokens (the reservation is capped at the key's tokens_per_minute).
    assumed_max_tokens: int = Field(default=1024, ge=1)
    # Prompt tokens no request field carries (workbench/gateway/tokens.py): the chat template's
    # framing per request (a default system prompt: SmolLM2's is ~20 tokens) and per message
    # (role markers: ~5 in ChatML), and each media part (vLLM's placeholders: model-dependent,
    # e.g. up to ~1,300 for a LLaVA-NeXT image); upper bounds, settled to usage afterwards.
    template_tokens: int = Field(default=32, ge=0)
    message_tokens: int = Field(default=8, ge=0)
    media_part_tokens: int = Field(default=4096, ge=0)
    # Hosts that chat content parts may name in media URLs (image_url, audio_url, video_url, any
    # {"url": ...}); "*.example.com" covers subdomains. None: any host; []: none. data: URLs
    # (inline content) always pass; anything else than http(s) is refused when a list is set.
    media_hosts: list[str] | None = None


class HttpConfig(Section):
    """The client-facing HTTP server (uvicorn + httptools, with workbench/gateway/http.py's limits).
    Past a timeout the client gets a 408 (or, once a reply has started, a closed connection)."""

    header_timeout_s: float = Field(default=10, gt=0)  # request line + headers, from the first byte
    body_timeout_s: float = Field(default=30, gt=0)  # the whole body, from the end of the headers
    keep_alive_s: float = Field(default=5, gt=0)  # an idle keep-alive connection is closed after it
    # Client connections; past it the longest-idle one (no request in flight) is closed to make
    # room, or, if all are busy, the newcomer gets 503. Keep it below the file-descriptor limit.
    max_client_connections: int = Field(default=1024, ge=1)
    graceful_shutdown_s: float = Field(default=10, ge=0)  # SIGTERM: requests in flight get this long
    # A reply the client does not read: once the socket's send buffer is full, the client has this
    # long to take some of it, else the connection is dropped (its buffered reply freed) and the
    # audit row says 408. Generous: a slow mobile link still reads something every few seconds.
    send_timeout_s: float = Field(default=30, gt=0)
    # Requests of one key whose body is still arriving, as a share of max_client_connections (per
    # gateway process): past it that key gets 429, so one key's slow bodies cannot fill the cap
    # and starve other keys and /health (requests waiting on the upstream are not counted).
    max_key_share: float = Field(default=0.5, gt=0, le=1)
    # Proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (addresses or networks, e.g.
    # ["10.0.0.0/8"]; "*" trusts any): the audit's ``client`` is then the address they forward.
    # Empty (the default): those headers are ignored and ``client`` is the peer's own address, so a
    # client cannot write another address into the audit log (uvicorn's default trusted 127.0.0.1).
    trusted_proxies: tuple[str, ...] = ()


class FilterConfig(Section):
    """Sensitive-word filter (Aho-Corasick over every word list), matched after folding the text:
    NFKD, zero-width and format characters dropped, look-alike letters and traditional Chinese
    folded, lowercase (workbench/gateway/normalize.py)."""

    enabled: bool = True
    word_lists: list[str] = ["data/gateway/sensitive_words.en.txt",
                             "data/gateway/sensitive_words.zh.txt"]
    action: Literal["block", "mask"] = "block"  # block: 400 (prompt) / 403 or final error event (output)
    mask: str = "***"
    prompts: bool = True
    output: bool = True  # every text field: content, reasoning, refusal, tool-call arguments
    # Han, kana and Hangul words also match with the text's whitespace removed (敏 感 词).
    cjk_ignore_spaces: bool = True


class LLMModerationConfig(Section):
    model: str | None = None  # a model routed by this gateway, e.g. a Llama Guard served by vLLM
    max_tokens: int = Field(default=10, ge=1)
    timeout_s: float = Field(default=10, gt=0)


class ModerationConfig(Section):
    policy: str | None = "keyword"  # a name in workbench.gateway.moderation.POLICIES; None: off
    before: bool = True  # check the prompt before it goes upstream
    after: bool = False  # check the completion (streams: a final error event after the text)
    on_error: Literal["allow", "block"] = "allow"  # when the policy itself fails (classifier down)
    patterns: list[str] = []  # keyword policy: regular expressions, matched caselessly
    llm: LLMModerationConfig = LLMModerationConfig()

    @model_validator(mode="after")
    def _llm_needs_model(self) -> "ModerationConfig":
        if self.policy == "llm" and not self.llm.model:
            raise ValueError("moderation.policy 'llm' needs moderation.llm.model")
        return self


class AuditConfig(Section):
    enabled: bool = True
    path: str = "runs/gateway/audit.sqlite"
    journal_mode: Literal["wal", "delete"] = "wal"
    # FULL: each batch is on disk before the next; the single writer thread batches, so a burst
    # costs one fsync per batch, not per request.
    synchronous: Literal["full", "normal"] = "full"
    prompt: Literal["store", "hash", "omit"] = "hash"  # hash: HMAC-SHA-256 of the prompt text
    # The HMAC key: this environment variable if set, else hash_secret_file (default: the
    # database's path + ".key"), created with 256 random bits (mode 0600) on first start.
    hash_secret_env: str | None = "WORKBENCH_GATEWAY_AUDIT_SECRET"
    hash_secret_file: str | None = None
    retention_days: float = Field(default=180, gt=0)  # enforced by `workbench gateway prune`
    batch_size: int = Field(default=500, ge=1)
    # After a batch's first row, wait this long for more before writing (group commit): at ~1,000
    # requests/s a commit with its fsync then holds ~10 rows, not 1-2 (benchmarks/gateway_cpu.py).
    # A row reaches the disk this much later; close() still drains every row. 0: no wait.
    batch_wait_s: float = Field(default=0.01, ge=0, le=1)
    # Refuse requests (503 audit_unavailable) while rows cannot be written, instead of serving
    # them unaudited. Either way /ready fails and /metrics shows it.
    fail_closed: bool = False
    min_free_mb: float = Field(default=64, ge=0)  # below: refuse to start; at run time, /ready fails
    # Rows of failed writes held in memory for a retry (every retry_s); beyond, the oldest are lost.
    max_pending_rows: int = Field(default=100_000, ge=1)
    retry_s: float = Field(default=1.0, gt=0)

    @property
    def secret_file(self) -> str:
        return self.hash_secret_file or self.path + ".key"


class GatewayConfig(Section):
    host: str = "127.0.0.1"
    port: int = 8080
    upstreams: dict[str, UpstreamConfig] = {}
    keys: list[KeyConfig] = []
    keys_file: str | None = None  # YAML list of KeyConfig, appended to by `add-key`
    keys_reload_s: float = Field(default=2, ge=0)  # keys_file re-read when changed (0: SIGHUP only)
    limits: LimitsConfig = LimitsConfig()
    http: HttpConfig = HttpConfig()
    filter: FilterConfig = FilterConfig()
    moderation: ModerationConfig = ModerationConfig()
    audit: AuditConfig = AuditConfig()
    # Processes serving one port (uvicorn's workers). Above 1 the limits must be shared, so
    # limits.backend must be redis.
    workers: int = Field(default=1, ge=1)

    @field_validator("workers")
    @classmethod
    def _workers_share_limits(cls, workers: int, info: ValidationInfo) -> int:
        limits = info.data.get("limits")  # validated before workers (field order)
        if workers > 1 and limits is not None and limits.backend != "redis":
            raise ValueError(f"workers: {workers} needs limits.backend: redis (with limits.redis_url): "
                             "with the in-process store every worker would enforce each limit on its own")
        return workers

    def model_routes(self) -> dict[str, str]:
        """Model name -> upstream name."""
        routes: dict[str, str] = {}
        for name, up in self.upstreams.items():
            for model in up.models or [name]:
                if model in routes:
                    raise GatewayConfigError(f"model '{model}' is served by both "
                                             f"'{routes[model]}' and '{name}'")
                routes[model] = name
        return routes

    def all_keys(self) -> list[KeyConfig]:
        keys = list(self.keys)
        if self.keys_file and Path(self.keys_file).exists():
            raw = yaml.safe_load(Path(self.keys_file).read_text())
            if raw is None:  # an empty file is a half-written one more often than an intent
                raise GatewayConfigError(f"keys_file {self.keys_file} is empty (write [] for no keys)")
            if not isinstance(raw, list):
                raise GatewayConfigError(f"keys_file {self.keys_file} must hold a list of keys, "
                                         f"got {type(raw).__name__}")
            try:
                keys += [KeyConfig.model_validate(k) for k in raw]
            except ValidationError as err:
                raise GatewayConfigError(_describe(err, self.keys_file)) from None
        ids = [k.id for k in keys]
        if len(set(ids)) != len(ids):
            raise GatewayConfigError(f"duplicate key ids: {sorted({i for i in ids if ids.count(i) > 1})}")
        return keys


def _describe(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        dotted = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{dotted}' in {source}")
        else:
            lines.append(f"bad value for '{dotted}' in {source}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | Path = CONFIG_FILE, **overrides) -> GatewayConfig:
    """Read and validate a gateway config; keyword overrides (host=..., port=...) win."""
    path = Path(path)
    if not path.is_file():  # never silent defaults: they would serve with no keys and no word lists
        raise GatewayConfigError(f"gateway config not found: {path.absolute()} (relative paths are "
                                 "read from the current directory; pass --config)")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise GatewayConfigError(f"{path} must hold a mapping, got {type(data).__name__}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = GatewayConfig.model_validate(data)
    except ValidationError as err:
        raise GatewayConfigError(_describe(err, str(path))) from None
    cfg.model_routes()  # fails early on a model claimed twice
    missing = [p for p in cfg.filter.word_lists if cfg.filter.enabled and not Path(p).is_file()]
    if missing:
        raise GatewayConfigError(f"filter.word_lists in {path}: not found: {', '.join(missing)} "
                                 f"(relative to the current directory, {Path.cwd()})")
    return cfg
