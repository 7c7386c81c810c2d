"""Write the perplexity corpora: fixed excerpts of the Python Language Reference.

    python data/eval/build_ppl_corpus.py

The text is CPython's own ``pydoc_data.topics`` (the help() pages of the Language Reference:
human-written English prose, shipped in every Python install, so it exists offline). Its wording
changes between Python releases, so the excerpts are written once to files under version control;
their sha256 is what evaluation reports record. Licence: Python Software Foundation License
(the CPython documentation is distributed under the same terms as CPython).

- ``ppl_corpus/python_docs.jsonl``: five long pages (~4k SmolLM2 tokens), the quantize stage's
  perplexity check (``quantize.check.ppl_corpus``).
- ``ppl_pages/python_reference_pages.jsonl``: the evaluate stage's corpus, one short excerpt
  (35-60 words) from each of the other topics: many independent pages of about equal size,
  because a perplexity interval resamples pages (chunks of one page are correlated), and its
  coverage depends on how many there are (benchmarks/decision_rule.py: >= 93 % from ~40 pages).
  Paragraphs in the calibration corpus or an earlier page are skipped, so no text is scored twice
  or calibrated on.
"""

import json
import platform
from pathlib import Path

import pydoc_data.topics

# Prose-heavy topics, in a fixed order; about 17 KB, ~4k SmolLM2 tokens.
TOPICS = ("objects", "naming", "exceptions", "truth", "with")
HERE = Path(__file__).resolve().parent
OUT = HERE / "ppl_corpus" / "python_docs.jsonl"
PAGES_OUT = HERE / "ppl_pages" / "python_reference_pages.jsonl"
CALIBRATION = HERE.parent / "calibration" / "python_docs_calib.jsonl"
# The calibration corpus's topics (data/calibration/build_calibration_corpus.py), never scored.
CALIBRATION_TOPICS = ("assignment", "class", "function", "import", "execmodel", "types", "numbers",
                      "compound", "lambda", "try", "typesseq", "attribute-access")
MIN_WORDS, MAX_WORDS = 35, 60  # per page: whole paragraphs up to MIN, cut at a sentence by MAX


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.strip().split("\n\n") if p.strip()]


def excerpt(paragraphs: list[str]) -> str:
    """Whole paragraphs until MIN_WORDS; if that overshoots MAX_WORDS, cut at the last sentence
    end (else line end) that keeps between MIN_WORDS and MAX_WORDS."""
    kept: list[str] = []
    for p in paragraphs:
        kept.append(p)
        if len(" ".join(kept).split()) >= MIN_WORDS:
            break
    text = "\n\n".join(kept)
    if len(text.split()) > MAX_WORDS:
        cut = [i + 1 for i, ch in enumerate(text) if ch == "." and text[i + 1:i + 2] in (" ", "\n")
               and MIN_WORDS <= len(text[:i + 1].split()) <= MAX_WORDS]
        if not cut:  # no sentence ends in range (a grammar or a table): cut at a line end
            cut = [i for i, ch in enumerate(text) if ch == "\n" and MIN_WORDS <= len(text[:i].split()) <= MAX_WORDS]
        if cut:
            text = text[:cut[-1]].rstrip()
    return text + "\n"


def pages() -> list[dict]:
    seen = {p for path in (OUT, CALIBRATION) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() for p in _paragraphs(json.loads(line)["page"])}
    rows = []
    for key in sorted(pydoc_data.topics.topics):
        if key in TOPICS or key in CALIBRATION_TOPICS:
            continue
        fresh = [p for p in _paragraphs(pydoc_data.topics.topics[key]) if p not in seen]
        text = excerpt(fresh)
        if len(text.split()) < MIN_WORDS:
            continue  # too little prose of its own
        seen.update(_paragraphs(text))
        rows.append({"page": text, "title": key,
                     "source": f"CPython {platform.python_version()} pydoc_data.topics"})
    return rows


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        for key in TOPICS:
            page = pydoc_data.topics.topics[key].strip() + "\n"
            row = {"page": page, "title": key, "source": f"CPython {platform.python_version()} pydoc_data.topics"}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    PAGES_OUT.parent.mkdir(parents=True, exist_ok=True)
    rows = pages()
    PAGES_OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    for path in (OUT, PAGES_OUT):
        print(path, path.stat().st_size)
    print(len(rows), "pages,", sum(len(r["page"].split()) for r in rows), "words")
