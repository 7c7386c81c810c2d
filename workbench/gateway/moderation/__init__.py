"""Moderation policies: a small registry. A policy checks a text before generation (the prompt)
and, when configured, after it (the completion) and returns a ``Verdict``.

    @register("keyword")
    class KeywordPolicy(Policy): ...

``keyword`` (regular expressions from the config) is the default; ``llm`` asks a classifier model
routed by the gateway (a Llama Guard served by vLLM) with a Llama Guard-style prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable

from workbench.gateway.config import ModerationConfig

POLICIES: dict[str, type["Policy"]] = {}


@dataclass(frozen=True, slots=True)
class Verdict:
    flagged: bool
    category: str | None = None  # e.g. "S1" (Llama Guard) or the matched pattern
    error: str | None = None  # the policy failed; flagged then follows moderation.on_error

    def label(self) -> str:
        if self.error:
            return "error"
        return f"flagged:{self.category}" if self.flagged else "ok"


# (model, messages, max_tokens, timeout_s) -> completion text. The gateway passes its own
# upstream client, so a classifier is reached like any other routed model.
ChatFn = Callable[[str, list[dict], int, float], Awaitable[str]]


class Policy:
    name = "base"

    def __init__(self, cfg: ModerationConfig, chat: ChatFn):
        self.cfg = cfg
        self.chat = chat

    async def check(self, text: str, stage: str) -> Verdict:  # stage: "input" | "output"
        raise NotImplementedError


def register(name: str):
    def deco(cls: type[Policy]) -> type[Policy]:
        cls.name = name
        POLICIES[name] = cls
        return cls
    return deco


def build_policy(cfg: ModerationConfig, chat: ChatFn) -> Policy | None:
    if not cfg.policy:
        return None
    if cfg.policy not in POLICIES:
        raise ValueError(f"unknown moderation policy '{cfg.policy}'; known: {sorted(POLICIES)}")
    return POLICIES[cfg.policy](cfg, chat)


from workbench.gateway.moderation import keyword, llm  # noqa: E402,F401  (register the built-ins)
