"""``llm``: ask a safety classifier served by vLLM (Llama Guard 3 or alike) through the gateway.

The prompt follows Llama Guard 3's model card (meta-llama/Llama-Guard-3-1B): the categories, the
conversation, then "First line must read 'safe' or 'unsafe'. If unsafe, a second line must include
a comma-separated list of violated categories." The reply's first line decides.
"""

from __future__ import annotations

from workbench.gateway.moderation import Policy, Verdict, register

CATEGORIES = """S1: Violent Crimes.
S2: Non-Violent Crimes.
S3: Sex Crimes.
S4: Child Exploitation.
S5: Defamation.
S6: Specialized Advice.
S7: Privacy.
S8: Intellectual Property.
S9: Indiscriminate Weapons.
S10: Hate.
S11: Self-Harm.
S12: Sexual Content.
S13: Elections."""

TEMPLATE = """Task: Check if there is unsafe content in '{role}' messages in conversations according our safety policy with the below categories.

<BEGIN UNSAFE CONTENT CATEGORIES>
{categories}
<END UNSAFE CONTENT CATEGORIES>

<BEGIN CONVERSATION>

{role}: {text}

<END CONVERSATION>

Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:
 - First line must read 'safe' or 'unsafe'.
 - If unsafe, a second line must include a comma-separated list of violated categories."""


def parse_reply(reply: str) -> Verdict:
    lines = [ln.strip() for ln in reply.strip().splitlines() if ln.strip()]
    if not lines:
        return Verdict(False, error="empty classifier reply")
    first = lines[0].lower()
    if first.startswith("unsafe"):
        return Verdict(True, lines[1] if len(lines) > 1 else "unsafe")
    if first.startswith("safe"):
        return Verdict(False)
    return Verdict(False, error=f"unparsable classifier reply: {lines[0][:40]!r}")


@register("llm")
class LLMPolicy(Policy):
    async def check(self, text: str, stage: str) -> Verdict:
        role = "User" if stage == "input" else "Agent"
        prompt = TEMPLATE.format(role=role, categories=CATEGORIES, text=text)
        reply = await self.chat(self.cfg.llm.model, [{"role": "user", "content": prompt}],
                                self.cfg.llm.max_tokens, self.cfg.llm.timeout_s)
        return parse_reply(reply)
