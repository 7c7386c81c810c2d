"""Write data/calibration/python_docs_calib.jsonl: quantization calibration text, offline.

    python data/calibration/build_calibration_corpus.py

Pages of CPython's ``pydoc_data.topics`` (human-written English prose of the Language Reference),
chosen disjoint from the perplexity corpus (data/eval/build_ppl_corpus.py) so that calibrating on
it does not flatter the perplexity a quantized variant is judged by.
"""

import importlib.util
import json
import platform
from pathlib import Path

import pydoc_data.topics

HERE = Path(__file__).resolve().parent
TOPICS = ("assignment", "class", "function", "import", "execmodel", "types", "numbers",
          "compound", "lambda", "try", "typesseq", "attribute-access")
OUT = HERE / "python_docs_calib.jsonl"

if __name__ == "__main__":
    spec = importlib.util.spec_from_file_location("ppl", HERE.parent / "eval" / "build_ppl_corpus.py")
    ppl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ppl)
    assert not set(TOPICS) & set(ppl.TOPICS), "calibration must not overlap the perplexity corpus"
    # Topics share text: "execmodel" contains the "naming" page and "compound" the "with" statement,
    # both scored by the perplexity corpus. Paragraphs found in that corpus's file are dropped.
    scored = {p.strip() for line in ppl.OUT.read_text(encoding="utf-8").splitlines() if line.strip()
              for p in json.loads(line)["page"].split("\n\n") if p.strip()}
    dropped = 0
    with open(OUT, "w", encoding="utf-8") as f:
        for key in TOPICS:
            paragraphs = pydoc_data.topics.topics[key].strip().split("\n\n")
            kept = [p for p in paragraphs if p.strip() not in scored]
            dropped += len(paragraphs) - len(kept)
            page = "\n\n".join(kept).strip() + "\n"
            f.write(json.dumps({"page": page, "title": key,
                                "source": f"CPython {platform.python_version()} pydoc_data.topics"},
                               ensure_ascii=False) + "\n")
    print(OUT, OUT.stat().st_size, f"bytes; {dropped} paragraphs shared with the perplexity corpus dropped")
