"""``evaluate``: accuracy (MMLU, C-Eval) and perplexity of one variant or arm, through lm-eval or a
chat endpoint. See workbench/evaluate/."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from workbench.config.base import ComputeDtype, Section
from workbench.config.loadtest import LlamaCppArm, UrlArm, VllmArm
from workbench.config.serve import LlamaCppConfig, ServerConfig
# Imported by these names: several configs have fields called ``variants`` and ``model_dir``.
from workbench.variants import BASE as BASE_VARIANT, model_dir as variant_dir


class EvalSuiteConfig(Section):
    """One multiple-choice suite (MMLU or C-Eval), run through lm-eval's own task definitions."""

    enabled: bool = True
    # Local folder in the hub's layout (<subject>/<split>-*.parquet|.jsonl|.csv, as cais/mmlu and
    # ceval/ceval-exam ship, or C-Eval's zip layout <split>/<subject>_<split>.csv), read offline.
    # None: lm-eval's stock task unchanged, which downloads from the hub.
    data_dir: str | None = None
    subjects: list[str] | None = None  # lm-eval subject names; None: every subject found
    # Examples from the dev split (lm-eval: first_n). 5: the standard MMLU / C-Eval setting.
    num_fewshot: int = Field(default=5, ge=0)
    limit: int | None = Field(default=None, ge=1)  # questions per subject; None: all


class PerplexityEvalConfig(Section):
    """Rolling log-likelihood per document, as lm-eval's wikitext task scores it."""

    enabled: bool = True
    # Folder of *.jsonl with a "page" field per document; None: lm-eval's stock `wikitext` (hub).
    # The shipped corpus: 52 short pages of about equal size (data/eval/README.md), because the
    # perplexity interval resamples pages and covers >= 93 % from ~40 of them (issue 28).
    data_dir: str | None = "data/eval/ppl_pages"
    # Split each page at blank lines into consecutive chunks of at least this many words (the last
    # short remainder joins the previous chunk); each chunk is one document to lm-eval, and keeps
    # its page's id, which the interval resamples (chunks of one page are correlated). The shipped
    # pages are shorter than 100 words: one chunk each. None: whole pages. Local data_dir only.
    chunk_words: int | None = Field(default=100, ge=1)
    limit: int | None = Field(default=None, ge=1)  # documents (chunks); None: all


class ChatEvalConfig(Section):
    """evaluate.backend: chat - the questions asked through /v1/chat/completions of any OpenAI-
    compatible server, the answer letter read from each reply (workbench/evaluate/chat.py)."""

    # A running server's URL (root or .../v1: a hosted API, another engine); None: start one here,
    # the variant on vLLM (evaluate.server) or the GGUF on llama.cpp (``llamacpp``), per ``server``.
    endpoint: str | None = None
    server: Literal["vllm", "llamacpp"] = "vllm"  # managed server when endpoint is None
    llamacpp: LlamaCppConfig = LlamaCppConfig()
    model: str | None = None  # model name in requests; None: the managed server's served name
    # The NAME of an environment variable that holds the API key (e.g. OPENAI_API_KEY). The key
    # itself is never written to params, reports, MLflow or logs. None: no key is sent.
    api_key_env: str | None = None
    # Told to the model as a system message before the questions: chat models answer in prose
    # otherwise, and what is not a letter counts as an extraction failure.
    system_instruction: str | None = "Answer with the letter (A, B, C or D) of the correct option."
    max_tokens: int = Field(default=16, ge=1)  # per answer: a letter, or "The answer is B."
    num_concurrent: int = Field(default=1, ge=1)  # requests in flight (a hosted API: raise it)
    timeout_s: float = Field(default=120, gt=0)  # per request


class EvaluateConfig(Section):
    """Accuracy (MMLU, C-Eval) and perplexity of one model variant. See workbench/evaluate/."""

    variant: str = BASE_VARIANT  # set by the runner (--variant; DVC's foreach), read as cfg.variant
    model_dir: str | None = None  # None: models/<variant>; also the tokenizer lm-eval uses
    # vllm: lm-eval's in-process vLLM model, scoring a multiple-choice question in one forward pass
    # (workbench/evaluate/lmeval_vllm.py) - the fast path; vllm-server: the variant served by
    # workbench.serve (lm-eval `local-completions`, prompt log-probs from /v1/completions) or a
    # running `endpoint`; hf: lm-eval's `hf` model (transformers), the reference vLLM is held to.
    # chat: any chat endpoint (evaluate.chat), the answer letter generated rather than scored.
    backend: Literal["vllm-server", "vllm", "hf", "chat"] = "vllm"
    # When vLLM cannot serve the variant on this machine (e.g. vLLM-CPU's 4-bit kernel needs
    # AVX-512), evaluate it through this backend instead, and say so in the report. None: fail.
    fallback_backend: Literal["hf"] | None = "hf"
    endpoint: str | None = None  # vllm-server: a running server's root URL; None: start `server`
    server: ServerConfig = ServerConfig()  # its model_dir is replaced by the variant's folder
    dtype: ComputeDtype = "auto"  # hf / vllm backends (the server uses server.dtype)
    mmlu: EvalSuiteConfig = EvalSuiteConfig(data_dir="data/eval/mmlu_smoke")
    ceval: EvalSuiteConfig = EvalSuiteConfig(data_dir="data/eval/ceval_smoke")
    perplexity: PerplexityEvalConfig = PerplexityEvalConfig()
    chat: ChatEvalConfig = ChatEvalConfig()  # backend: chat only
    # Requests scored together. "auto": workbench.evaluate.backends.AUTO_BATCH, each backend's fast
    # setting on a CPU (1 for all: batches gained nothing there, hf's padded ones lost). Batches
    # follow lm-eval's fixed order, so a run repeats exactly.
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    seed: int = 0  # lm-eval's python / numpy / torch / fewshot seeds
    baseline: str | None = BASE_VARIANT  # variant whose report the deltas are taken against
    # The variants evaluated against ``baseline``. None: every quantize.variants entry with
    # serve: true and every loadtest.arms name (filled by Params; an arm is evaluated as ``for_arm``). dvc.yaml has an evaluate stage per quantize.variants key; one
    # not listed here writes a short "not evaluated" report instead of loading the model.
    variants: list[str] | None = None
    work_dir: str = "runs/evaluate"  # per-sample lm-eval outputs: <work_dir>/<variant>/

    @property
    def model_path(self) -> str:
        return variant_dir(self.variant, self.model_dir)

    def for_arm(self, arm: "VllmArm | LlamaCppArm | UrlArm") -> "EvaluateConfig":
        """This config for the ``loadtest.arms`` entry its variant names, reached as the load test
        reaches it (one home for an arm: its load-test entry), so that every arm answers the same
        questions: a llama.cpp or URL arm through chat completions (the only scoring they offer;
        perplexity where the endpoint returns prompt log-probabilities), a vLLM arm as its variant's
        folder with this config's backend."""
        if isinstance(arm, VllmArm):
            return self.model_copy(update={"model_dir": self.model_dir or variant_dir(arm.variant or arm.name)})
        chat = ({"endpoint": arm.base_url, "model": arm.model, "api_key_env": arm.api_key_env}
                if isinstance(arm, UrlArm) else {"endpoint": None, "server": "llamacpp", "llamacpp": arm.server})
        return self.model_copy(update={"backend": "chat", "fallback_backend": None,
                                       "chat": self.chat.model_copy(update=chat)})
