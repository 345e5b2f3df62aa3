"""The vLLM teacher backend: an in-process ``vllm.LLM`` returning prompt log-probs.

Each (prompt + response) sequence is submitted as a prompt with ``prompt_logprobs=K`` and one
token to generate (which is discarded). The engine keeps ``logprobs_mode=raw_logprobs``: the
log-softmax of the model's own logits, i.e. temperature 1, before any sampling processor.
Prefix caching is off so that every position is computed, and the tokenizer is not loaded
(token ids in, token ids out). Log-probs come back flat (``flat_logprobs``): per position the
actual next token first, then the top K.

The top K is taken over the student's ids (``scored_vocab``) only. vLLM ranks every row, so with
R teacher rows beyond them the engine is asked for K + R log-probs: at most R of those are rows
the student lacks, and dropping them leaves the top K over the student's ids, exactly.
"""

from __future__ import annotations

import os

import torch

from tip_ray.config import TeacherConfig
from tip_ray.rollout.vllm_args import engine_kwargs, on_cpu_build


class VLLMScorer:
    """Prompt log-probs from vLLM for right-padded sequences."""

    def __init__(self, cfg: TeacherConfig, vocab_size: int, scored_vocab: int | None = None) -> None:
        """An engine for ``cfg.model`` (``vocab_size`` rows) scoring ids below ``scored_vocab``
        (None: all). ``ValueError`` before the engine starts if it may not return the log-probs
        that takes (``top_k``, or every scored id when ``top_k`` is null, plus the rows beyond
        ``scored_vocab``)."""
        self.scored_vocab = min(scored_vocab or vocab_size, vocab_size)
        self.extra = vocab_size - self.scored_vocab  # rows the student lacks: asked for, then dropped
        k = cfg.top_k or self.scored_vocab
        if k + self.extra > cfg.max_logprobs:
            what = (f"the full distribution ({k} log-probs per position)" if cfg.top_k is None else
                    f"teacher.top_k = {k} log-probs per position")
            beyond = (f" plus {self.extra} for the teacher's rows beyond the student's {self.scored_vocab} (dropped "
                      "after ranking)" if self.extra else "")
            raise ValueError(
                f"the vllm backend needs {what}{beyond}, {k + self.extra} in all, but teacher.max_logprobs is "
                f"{cfg.max_logprobs}; raise teacher.max_logprobs to >= {k + self.extra}, lower teacher.top_k, or use "
                "teacher.backend=hf")
        # In-process engine core: the model and requests stay in this actor's process.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.max_model_len = cfg.max_model_len
        extra = {} if cfg.max_num_batched_tokens is None else {"max_num_batched_tokens": cfg.max_num_batched_tokens}
        # Eager on every device: scoring is prefill, which CUDA graphs (decode batches) do not cover.
        self.llm = LLM(
            **engine_kwargs(cfg, cfg.model, "teacher", on_cpu_build()),
            **extra,
            max_logprobs=cfg.max_logprobs,
            logprobs_mode="raw_logprobs",
            enable_prefix_caching=False,
            skip_tokenizer_init=True,
            enforce_eager=True,
            seed=0,
        )
        engine_vocab = int(self.llm.llm_engine.model_config.get_vocab_size())
        if engine_vocab != vocab_size:
            raise ValueError(f"vLLM sees a vocabulary of {engine_vocab} for {cfg.model}, its config says {vocab_size}")

    def topk(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int,
        first_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For right-padded ``input_ids``/``attention_mask`` [B, L]: ids [B, L-1, k] (long) and fp32
        log-probs [B, L-1, k] of the k most likely next tokens among the first ``scored_vocab``
        ids (log-probs normalised over every row), and the fp32 log-prob [B, L-1] of the actual
        next token; padding positions hold zeros. ``first_position`` is accepted for the hf
        backend's interface and unused: vLLM's prompt log-probs cover the whole prompt."""
        from vllm import SamplingParams

        batch, length = input_ids.shape
        lengths = attention_mask.sum(dim=1).tolist()
        if max(lengths, default=0) >= self.max_model_len:
            raise ValueError(f"a sequence of {max(lengths)} tokens does not fit teacher.max_model_len="
                             f"{self.max_model_len} (the vllm backend needs the length + 1)")
        ids = torch.zeros(batch, length - 1, k, dtype=torch.long)
        values = torch.zeros(batch, length - 1, k, dtype=torch.float32)
        sampled = torch.zeros(batch, length - 1, dtype=torch.float32)
        rows = [b for b, n in enumerate(lengths) if n >= 2]
        asked = k + self.extra
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=asked, flat_logprobs=True,
                                detokenize=False, seed=0)
        prompts = [{"prompt_token_ids": input_ids[b, : lengths[b]].tolist()} for b in rows]
        outputs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        for b, output in zip(rows, outputs):
            n, flat = lengths[b], output.prompt_logprobs
            first = flat.start_indices[1]  # position 0 (the first token) has no prediction
            tokens = torch.tensor(flat.token_ids[first:], dtype=torch.long).view(n - 1, asked + 1)
            logprobs = torch.tensor(flat.logprobs[first:], dtype=torch.float32).view(n - 1, asked + 1)
            if not torch.equal(tokens[:, 0], input_ids[b, 1:n].long()):
                raise RuntimeError("vLLM's prompt log-probs do not start with the prompt token: an unsupported "
                                   "vLLM version")
            top_tokens, top_logprobs = keep_scored(tokens[:, 1:], logprobs[:, 1:], k, self.scored_vocab)
            ids[b, : n - 1], values[b, : n - 1], sampled[b, : n - 1] = top_tokens, top_logprobs, logprobs[:, 0]
        return ids, values, sampled


def keep_scored(ids: torch.Tensor, logprobs: torch.Tensor, k: int, scored_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best entries with an id below ``scored_vocab`` of ranked entries ``ids``/``logprobs``
    [T, k + extra] (descending log-prob, at most ``extra`` ids per row at or above
    ``scored_vocab``): ids and log-probs [T, k], in rank order."""
    if ids.shape[-1] == k:
        return ids, logprobs
    outside = ids >= scored_vocab
    if bool((outside.sum(-1) > ids.shape[-1] - k).any()):
        raise RuntimeError(f"fewer than {k} of the {ids.shape[-1]} ranked ids are below {scored_vocab}")
    order = torch.argsort(outside.to(torch.int8), dim=-1, stable=True)[..., :k]  # scored ids first, rank kept
    return ids.gather(-1, order), logprobs.gather(-1, order)
