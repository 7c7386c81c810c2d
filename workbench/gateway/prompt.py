"""Where a request carries text: every field the prompt filter and moderation must read.

Decided field by field (issue 31, finding 3). A field that carries text is filtered (block: 400;
mask: rewritten in place); a field that carries text the gateway cannot rewrite is checked and,
if it matches in mask mode, refused; a field that cannot be read at all is refused while the
prompt filter is on:

- chat messages: ``content`` (string or text parts), ``name``, ``reasoning_content`` /
  ``reasoning``, ``refusal``, ``tool_calls[].function.name`` / ``.arguments`` and the legacy
  ``function_call``: filtered;
- ``tools`` / ``functions`` (names, descriptions, parameter schemas), ``tool_choice``,
  ``response_format`` / ``guided_*`` schemas, ``chat_template_kwargs``, ``documents``: every string
  value filtered; object keys (a schema's property names) checked, refused on a hit in mask mode;
- completions ``prompt`` and ``suffix``, embeddings ``input``: filtered;
- token-ID prompts: decoded with the upstream's tokenizer and checked (refused on a hit in mask
  mode: masking would need re-encoding); without a tokenizer, refused;
- ``chat_template`` (a Jinja template that can print any text): refused.
"""

from __future__ import annotations

Slot = tuple[object, object]  # (container, key): holder[key] is a prompt string

_MESSAGE_TEXT = ("content", "name", "reasoning_content", "reasoning", "refusal")
_NESTED = ("tools", "functions", "tool_choice", "response_format", "guided_json", "guided_regex",
           "guided_choice", "guided_grammar", "structured_outputs", "chat_template_kwargs", "documents")
UNREADABLE = ("chat_template",)


def _nested(holder, key, slots: list[Slot], keys: list[str]) -> None:
    """Every string value under ``holder[key]`` as a slot; object keys into ``keys``."""
    v = holder[key]
    if isinstance(v, str):
        slots.append((holder, key))
    elif isinstance(v, dict):
        for k in v:
            keys.append(k) if isinstance(k, str) else None
            _nested(v, k, slots, keys)
    elif isinstance(v, list):
        for i in range(len(v)):
            _nested(v, i, slots, keys)


def _message(m: dict, slots: list[Slot], keys: list[str]) -> None:
    for k in _MESSAGE_TEXT:
        v = m.get(k)
        if isinstance(v, str):
            slots.append((m, k))
        elif k == "content" and isinstance(v, list):
            slots += [(p, "text") for p in v if isinstance(p, dict) and isinstance(p.get("text"), str)]
    for tc in m.get("tool_calls") or () if isinstance(m.get("tool_calls"), list) else ():
        fn = tc.get("function") if isinstance(tc, dict) else None
        if isinstance(fn, dict):
            slots += [(fn, k) for k in ("name", "arguments") if isinstance(fn.get(k), str)]
    fc = m.get("function_call")
    if isinstance(fc, dict):
        slots += [(fc, k) for k in ("name", "arguments") if isinstance(fc.get(k), str)]


def text_slots(route: str, req: dict) -> tuple[list[Slot], list[str], list[list[int]]]:
    """(slots of every prompt string, texts that cannot be rewritten (object keys), token-ID
    prompts). The slots' order is the prompt's order, so their texts joined are the prompt."""
    slots: list[Slot] = []
    keys: list[str] = []
    ids: list[list[int]] = []
    if route == "chat":
        for m in req["messages"]:
            _message(m, slots, keys)
        for k in _NESTED:
            if k in req:
                _nested(req, k, slots, keys)
        return slots, keys, ids
    field = "prompt" if route == "completions" else "input"
    v = req[field]
    if isinstance(v, str):
        slots.append((req, field))
    elif isinstance(v, list):
        slots += [(v, i) for i, x in enumerate(v) if isinstance(x, str)]
        tokens = [x for x in v if not isinstance(x, str)]
        if tokens:
            ids.append(tokens)
    if isinstance(req.get("suffix"), str):
        slots.append((req, "suffix"))
    return slots, keys, ids
