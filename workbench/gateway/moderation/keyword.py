"""``keyword``: the config's regular expressions, compiled into one caseless alternation, matched
against the text as it is and as the sensitive-word filter folds it (normalize.py: look-alikes,
full-width and invisible characters, each run of whitespace as one space), so ``how to  make a
bomb`` with two spaces, an NBSP, a ZWSP, a Cyrillic ``а`` or a newline is caught like the plain one."""

from __future__ import annotations

import re

from workbench.gateway.moderation import Policy, Verdict, register
from workbench.gateway.normalize import fold, odd_spaces, squeeze


@register("keyword")
class KeywordPolicy(Policy):
    def __init__(self, cfg, chat):
        super().__init__(cfg, chat)
        self.regex = (re.compile("|".join(f"(?:{p})" for p in cfg.patterns), re.IGNORECASE)
                      if cfg.patterns else None)

    async def check(self, text: str, stage: str) -> Verdict:
        if self.regex is None:
            return Verdict(False)
        m = self.regex.search(text)
        if m is None and not (text.isascii() and not odd_spaces(text)):  # else folding is lower()
            m = self.regex.search(squeeze(fold(text))[0])
        return Verdict(True, m.group(0)[:64]) if m else Verdict(False)
