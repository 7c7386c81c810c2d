"""Stage ``evaluate``: MMLU, C-Eval and perplexity of one model variant, all through lm-eval.

    workbench evaluate                                         # models/base, vLLM in-process
    python -m pipelines.run_stage evaluate --variant gptq-int4 --set evaluate.mmlu.limit=5
    workbench evaluate --set evaluate.backend=vllm-server      # through the variant's vLLM server
    workbench evaluate --set evaluate.backend=hf               # lm-eval's transformers reference

Backends (a registry in ``backends``): ``vllm`` (default) is lm-eval's in-process vLLM model scoring a
multiple-choice question in one request (``workbench.evaluate.lmeval_vllm``); ``vllm-server`` asks
``workbench.serve`` for the variant's OpenAI endpoint and scores prompts through lm-eval's
``local-completions`` (``/v1/completions`` with ``echo``, ``logprobs``: prompt log-probabilities);
``hf`` is lm-eval's transformers model. Tasks, prompts and scorers are lm-eval's own
(``mmlu``, ``ceval-valid``, ``wikitext``); ``workbench.evaluate.sets`` only points them at local files.

The report (reports/evaluate/<variant>.json) holds overall / per-category / per-subject accuracy
with standard errors and Wilson intervals, perplexities with a bootstrap interval over source pages,
the data's names and sha256, the backend and timings, and the difference to the ``baseline``
variant's report when one exists and used the same data: the deltas of the headline numbers, and
paired comparisons on the same questions and documents (Newcombe's paired interval per multiple-choice suite,
a paired bootstrap over source pages of the word perplexity change) read from both variants' per-sample records.
Those records go to runs/evaluate/<variant>/<suite>.jsonl; ``question_records`` and
``document_records`` read them back for other stages.

The package: ``stage`` (``run(cfg)``, notebook tables), ``results`` (lm-eval's output parsed, the
per-sample records, intervals, the comparison with the baseline), ``sets`` (suites as
lm-eval tasks over local files), ``backends`` (the registry of how lm-eval reaches the model) and
``lmeval_vllm`` (lm-eval's in-process vLLM model, one forward pass per question).
"""

from workbench.evaluate.backends import BACKENDS, Backend
from workbench.evaluate.results import (
    PPL_METRICS, SAME_DATA_KEYS, accuracy_intervals, compare, document_records, paired, parse_mcq, parse_perplexity,
    question_records,
)
from workbench.evaluate.stage import STAGE, FallbackFailed, lm_eval_env, run, subject_table, summary

__all__ = ["BACKENDS", "Backend", "FallbackFailed", "PPL_METRICS", "SAME_DATA_KEYS", "STAGE",
           "accuracy_intervals", "compare", "document_records", "lm_eval_env", "paired", "parse_mcq",
           "parse_perplexity", "question_records", "run", "subject_table", "summary"]
