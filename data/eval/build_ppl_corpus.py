"""Write data/eval/ppl_corpus/python_docs.jsonl: a fixed excerpt of the Python Language Reference.

    python data/eval/build_ppl_corpus.py

The text is CPython's own ``pydoc_data.topics`` (the help() pages of the Language Reference:
human-written English prose, shipped in every Python install, so it exists offline). Its wording
changes between Python releases, so the excerpt is written once to a file under version control;
its sha256 is what evaluation reports record. Licence: Python Software Foundation License
(the CPython documentation is distributed under the same terms as CPython).
"""

import json
import platform
from pathlib import Path

import pydoc_data.topics

# Prose-heavy topics, in a fixed order; about 17 KB, ~4k SmolLM2 tokens.
TOPICS = ("objects", "naming", "exceptions", "truth", "with")
OUT = Path(__file__).resolve().parent / "ppl_corpus" / "python_docs.jsonl"

if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        for key in TOPICS:
            page = pydoc_data.topics.topics[key].strip() + "\n"
            row = {"page": page, "title": key, "source": f"CPython {platform.python_version()} pydoc_data.topics"}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(OUT, OUT.stat().st_size)
