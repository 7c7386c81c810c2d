"""``keyword``: the config's regular expressions, compiled into one caseless alternation."""

from __future__ import annotations

import re

from workbench.gateway.moderation import Policy, Verdict, register


@register("keyword")
class KeywordPolicy(Policy):
    def __init__(self, cfg, chat):
        super().__init__(cfg, chat)
        self.regex = (re.compile("|".join(f"(?:{p})" for p in cfg.patterns), re.IGNORECASE)
                      if cfg.patterns else None)

    async def check(self, text: str, stage: str) -> Verdict:
        m = self.regex.search(text) if self.regex else None
        return Verdict(True, m.group(0)[:64]) if m else Verdict(False)
