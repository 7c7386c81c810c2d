"""Any chat endpoint scored on the same questions: MMLU and C-Eval through /v1/chat/completions.

    workbench evaluate --set evaluate.backend=chat                                   # the variant on vLLM
    workbench evaluate --set evaluate.backend=chat --set evaluate.chat.server=llamacpp   # the GGUF on llama.cpp
    OPENAI_API_KEY=... workbench evaluate --set evaluate.backend=chat \
        --set evaluate.chat.endpoint=https://api.example.com/v1 --set evaluate.chat.model=NAME \
        --set evaluate.chat.api_key_env=OPENAI_API_KEY                                # any URL

lm-eval's ``local-chat-completions`` model asks each question as a chat (the suite's few-shot
examples as earlier turns, ``evaluate.chat.system_instruction`` first); the tasks are lm-eval's
generative variants (``workbench.evaluate.sets.generative_task``), the answer letter read from the
reply by a regex, and a reply without one recorded as ``[invalid]``: wrong, and counted
(``extraction_failures``). Question ids equal the log-likelihood tasks', so per-question records
pair with any other arm's (``results.paired``: exact McNemar).

Perplexity needs prompt log-probabilities (``/v1/completions`` with ``echo``) and the model's
tokenizer (a local ``model_dir``): ``prompt_logprobs_unavailable`` asks the endpoint once, and
where either is missing the report says "not available from this API" with the reason. vLLM has
both; llama.cpp returns log-probs of generated tokens only (llama.cpp issue 27174); a hosted chat
API usually has no ``/v1/completions`` at all.

The key: only the *name* of an environment variable is configured (``api_key_env``); its value is
read here, handed to lm-eval through ``OPENAI_API_KEY`` for the stage's duration
(``Backend.env``), and never put in model arguments, reports, logs or MLflow.
"""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from workbench.config import EvaluateConfig

log = logging.getLogger(__name__)
PROBE_PROMPT = "The capital of France is"


class ChatEndpointError(ValueError):
    """A chat endpoint that cannot be used as configured; names the key or variable."""


def endpoint_root(url: str) -> str:
    """A server's root from its root or API URL: ``http://h:p/v1/`` -> ``http://h:p``."""
    return url.rstrip("/").removesuffix("/v1")


def api_key(env_name: str | None) -> str | None:
    """The key held by the environment variable ``env_name``; None when no name is configured."""
    if env_name is None:
        return None
    value = os.environ.get(env_name)
    if not value:
        raise ChatEndpointError(f"evaluate.chat.api_key_env names the environment variable '{env_name}', "
                                "which is not set (or empty): export it before running")
    return value


def prompt_logprobs_unavailable(base_url: str, model: str, key: str | None = None,
                                timeout_s: float = 60) -> str | None:
    """None when ``<base_url>/completions`` returns log-probabilities of the prompt's tokens (asked
    with ``echo``, as lm-eval's ``local-completions`` asks for log-likelihoods); else why not, in a
    sentence. ``base_url`` is the API root (``.../v1``). One short request."""
    url = f"{base_url.rstrip('/')}/completions"
    body = {"model": model, "prompt": PROBE_PROMPT, "max_tokens": 1, "temperature": 0, "echo": True,
            "logprobs": 1}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.post(url, json=body, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as err:
        return f"/v1/completions did not answer ({type(err).__name__})"
    if r.status_code != 200:
        return f"/v1/completions answered HTTP {r.status_code} to a request for prompt log-probabilities"
    try:
        out = r.json()
        choice = out["choices"][0]
        prompt_tokens = int(out["usage"]["prompt_tokens"])
        lps = choice.get("logprobs") or {}
        # OpenAI's legacy completions format (vLLM): token_logprobs over prompt + generated tokens;
        # llama.cpp's: "content", generated tokens only.
        scored = len(lps.get("token_logprobs") or lps.get("content") or [])
    except (ValueError, KeyError, IndexError, TypeError) as err:
        return f"/v1/completions answered without log-probabilities ({type(err).__name__}: {err})"
    if scored < prompt_tokens:
        return (f"/v1/completions returned log-probabilities of {scored} token(s) for a {prompt_tokens}-token "
                "prompt asked with echo: the prompt's are not returned")
    return None


def open_endpoint(cfg: EvaluateConfig, stack: ExitStack) -> tuple[str, str, dict[str, Any], str | None]:
    """(root URL, model name, report info, the managed server's own key) of the chat endpoint:
    ``evaluate.chat.endpoint``, or a server started on ``stack`` (stopped when the stage ends)."""
    c = cfg.chat
    if c.endpoint:
        if not c.model:
            raise ChatEndpointError("evaluate.chat.model: the model name to request is required with "
                                    "evaluate.chat.endpoint")
        root = endpoint_root(c.endpoint)
        return root, c.model, {"endpoint": root, "engine": "external"}, None
    if c.server == "llamacpp":
        from workbench.llamacpp import LlamaCppServer

        server = stack.enter_context(LlamaCppServer(c.llamacpp))
        name, engine = server.served_name, "llama.cpp"
    else:
        from workbench.serve import VLLMServer

        server = stack.enter_context(VLLMServer(cfg.server.model_copy(update={"model_dir": cfg.model_path})))
        name, engine = server.cfg.model_name, "vLLM"
    # the command without --api-key's value (evaluate.server.api_key), which the report must not carry
    info = {"endpoint": server.root_url, "engine": engine, "model_file": server.label,
            "server_startup_s": round(server.startup_s, 3), "server_command": server.shown_command()}
    return server.root_url, c.model or name, info, server.api_key


def model_fingerprint(cfg: EvaluateConfig) -> dict[str, Any] | None:
    """What a chat arm without a local model folder answers with, for the report's data
    fingerprint: the endpoint and model name, or the GGUF file and its sha256; None: the variant's
    folder (a managed vLLM) identifies it."""
    from workbench.reports import sha256_file

    c = cfg.chat
    if c.endpoint:
        return {"endpoint": endpoint_root(c.endpoint), "name": c.model}
    if c.server == "llamacpp":
        from workbench.llamacpp import model_path

        gguf = model_path(c.llamacpp.model)
        return {"gguf": str(gguf), "sha256": sha256_file(gguf) if gguf.is_file() else None}
    return None


def extraction_failures(records: list[dict]) -> dict[str, Any]:
    """Replies in which no answer letter was found, from a suite's per-question records."""
    from workbench.evaluate.sets import INVALID

    failed = sum(1 for r in records if r.get("extracted") is False or r.get("filtered_resps") in (INVALID, [INVALID]))
    return {"n": failed, "questions": len(records), "rate": round(failed / len(records), 6) if records else None}


def as_accuracy(res: dict) -> dict:
    """A generated-answer suite's rows with ``exact_match`` named ``acc``: the share of questions
    answered right, as every other backend reports it (an extraction failure counts as wrong)."""
    def rename(row: dict) -> dict:
        return {k.replace("exact_match", "acc"): v for k, v in row.items()}

    return {"overall": rename(res["overall"]),
            "categories": {k: rename(v) for k, v in res["categories"].items()},
            "subjects": {k: rename(v) for k, v in res["subjects"].items()}}


def perplexity_scorer(cfg: EvaluateConfig, chat, stack: ExitStack) -> Any:
    """For a chat arm: lm-eval's ``local-completions`` on the same endpoint (rolling
    log-likelihoods from prompt log-probs, tokens counted by the model's own tokenizer), or why
    perplexity is not available from this API."""
    from lm_eval.api.registry import get_model

    from workbench.evaluate.backends import BACKENDS

    if chat.info.get("prompt_logprobs") != "available":
        return f"not available from this API: {chat.info.get('prompt_logprobs')}"
    if not Path(cfg.model_path).is_dir():
        return (f"not available from this API: it returns prompt log-probabilities, but no tokenizer "
                f"folder (evaluate.model_dir) is here to count and window tokens ({cfg.model_path})")
    server = BACKENDS["vllm-server"](cfg.model_copy(update={"endpoint": chat.info["endpoint"]}), stack)
    args = {**server.model_args, "model": chat.model_args["model"]}
    return get_model(server.lm_eval_model).create_from_arg_obj(args, {"batch_size": server.batch_size})
