"""The request-side checks of the gateway app (a mixin of workbench/gateway/app.py, split out to
keep each file readable): the token reservation at admission (tokens.py counts the prompt), the
media-host allow-list, the sensitive-word filter over every prompt field (prompt.py) and
moderation. Each raises a ``GatewayError`` in OpenAI's shape when it refuses.
"""

from __future__ import annotations

import asyncio
import math
import time

from workbench.gateway.filter import WordFilter
from workbench.gateway.moderation import Verdict
from workbench.gateway.prompt import UNREADABLE, text_slots
from workbench.gateway.relay import Ctx, media_url_allowed
from workbench.gateway.tokens import OFF_LOOP_CHARS
from workbench.gateway.upstream import GatewayError


def _mask_slots(f: WordFilter, slots) -> int:
    """Mask every slot's text in place; the number of matches."""
    total = 0
    for c, k in slots:
        c[k], n = f.apply_mask(c[k])
        total += n
    return total


class Checks:
    async def _reserve_tokens(self, ctx: Ctx, key, route: str, req: dict, upstream: str) -> None:
        """Take the prompt (counted, tokens.py) plus max_tokens from the key's token bucket now, so
        that concurrent requests cannot overdraw it; ``settle`` turns this into the real usage."""
        counter = self.counters[upstream]
        texts, fixed, media = counter.texts(route, req)
        if counter.tokenizer is not None and sum(map(len, texts)) > OFF_LOOP_CHARS:
            counted, exact = await asyncio.to_thread(counter.count_texts, texts)
        else:
            counted, exact = counter.count_texts(texts)
        prompt = ctx.prompt_estimate = max(1, counted + fixed + media * counter.media)
        cap = key.tokens.capacity
        if exact and prompt > cap:  # it could never fit: no retry would help (OpenAI says 429 too)
            self.metrics.rate_limited.labels(key.id, "tokens").inc()
            raise GatewayError(429, f"Request too large for tokens per minute on key '{key.id}': its prompt "
                               f"is {prompt} tokens, the limit {cap:g} a minute.", "rate_limit_error",
                               "rate_limit_exceeded", param="messages" if route == "chat" else "prompt")
        out = 0
        if route != "embeddings":
            out = req.get("max_completion_tokens") or req.get("max_tokens") or self.cfg.limits.assumed_max_tokens
            out *= req.get("n") or 1
            p = req.get("prompt")
            if route == "completions" and isinstance(p, list) and p and isinstance(p[0], str):
                out *= len(p)  # a batch of prompts: a completion each
        n = min(prompt + out, cap)
        store = self.store  # memory: no await; redis: one atomic script, shared by every gateway
        adm = store.reserve_now(key, n) if store.backend == "memory" else await store.reserve(key, n)
        if adm.limit == "store":
            raise GatewayError(503, "Rate limits cannot be checked right now; retry shortly.",
                               "server_error", "limits_unavailable", headers=((b"retry-after", b"1"),))
        if adm.limit is not None:
            self.metrics.rate_limited.labels(key.id, "tokens").inc()
            retry = max(1, math.ceil(adm.wait_s))
            raise GatewayError(429, f"Rate limit reached for tokens per minute on key '{key.id}': this request "
                               f"reserves {n:g} tokens; retry in {retry} s.", "rate_limit_error",
                               "rate_limit_exceeded", headers=((b"retry-after", str(retry).encode()),))
        ctx.reserved, ctx.charged = n, key

    def _check_media(self, req: dict) -> None:
        """Media URLs in content parts must name a host of limits.media_hosts (no SSRF through
        the upstream's media fetcher, e.g. to http://169.254.169.254/)."""
        hosts = self.cfg.limits.media_hosts
        for i, m in enumerate(req["messages"]):
            parts = m.get("content")
            for j, part in enumerate(parts if isinstance(parts, list) else ()):
                for name, v in part.items() if isinstance(part, dict) else ():
                    url = v.get("url") if isinstance(v, dict) else v if name.endswith("_url") else None
                    if url is not None and not media_url_allowed(url, hosts):
                        raise GatewayError(400, "A media URL in the request names a host this gateway does "
                                           "not fetch from.", code="media_url_not_allowed",
                                           param=f"messages.{i}.content.{j}.{name}")

    async def _check_prompt(self, ctx: Ctx, route: str, req: dict, upstream: str) -> bool:
        """Sensitive words in every prompt field (prompt.py): 400 (block) or masked in place.
        True if req changed. A text over OFF_LOOP_CHARS is matched off the event loop."""
        slots, keys, ids = text_slots(route, req)
        f = self.filter
        on = bool(f and f.size and self.cfg.filter.prompts)
        param = "messages" if route == "chat" else "prompt" if route == "completions" else "input"
        decoded = []
        if ids and (on or (self.policy and self.cfg.moderation.before)):
            counter = self.counters[upstream]
            if counter.tokenizer is None:
                raise GatewayError(400, "Token-ID prompts cannot be checked by this gateway's content filter "
                                   f"(upstreams.{upstream}.tokenizer is not set); send text.",
                                   code="unfilterable_field", param=param)
            decoded = [counter.detokenize(x) for x in ids]
        text = "\n".join([*(c[k] for c, k in slots), *keys, *decoded])
        ctx.prompt = text
        if not on:
            return False
        for name in UNREADABLE:
            if name in req:
                raise GatewayError(400, f"'{name}' cannot be checked by this gateway's content filter; "
                                   "leave it out.", code="unfilterable_field", param=name)
        big = len(text) > OFF_LOOP_CHARS and self.filter_worker is not None
        if self.cfg.filter.action == "block":
            if await self.filter_worker.hits(text) if big else f.hits(text):
                ctx.filter.append("prompt:block")
                self.metrics.filter_hits.labels("prompt", "block").inc()
                raise GatewayError(400, "The prompt contains blocked content.", code="content_filter", param=param)
            return False
        unmaskable = "\n".join([*keys, *decoded])
        if unmaskable and f.hits(unmaskable):
            ctx.filter.append("prompt:block")
            self.metrics.filter_hits.labels("prompt", "block").inc()
            raise GatewayError(400, "The prompt contains blocked content where it cannot be masked "
                               "(token IDs or a field name).", code="content_filter", param=param)
        if big:
            texts, masked = await self.filter_worker.mask([c[k] for c, k in slots])
            for (c, k), t in zip(slots, texts):
                c[k] = t
        else:
            masked = _mask_slots(f, slots)
        if masked:
            ctx.filter.append(f"prompt:mask:{masked}")
            self.metrics.filter_hits.labels("prompt", "mask").inc(masked)
            ctx.prompt = "\n".join([*(c[k] for c, k in slots), *keys, *decoded])
        return bool(masked)

    async def _moderate(self, ctx: Ctx, text: str, stage: str, raise_: bool = True) -> Verdict:
        name = self.policy.name
        t0 = time.perf_counter()
        try:
            verdict = await self.policy.check(text, stage)
        except Exception as err:  # the classifier is down or slow: on_error decides
            verdict = Verdict(self.cfg.moderation.on_error == "block", error=f"{type(err).__name__}: {err}")
        self.metrics.moderation_latency.labels(name, stage).observe(time.perf_counter() - t0)
        ctx.moderation.append(f"{stage}:{verdict.label()}")
        if verdict.flagged:
            self.metrics.moderation_blocks.labels(name, stage).inc()
            if raise_:
                raise GatewayError(400, f"The {'prompt' if stage == 'input' else 'output'} was flagged by "
                                   f"moderation ({verdict.category or verdict.error}).",
                                   code="content_moderation")
        return verdict
