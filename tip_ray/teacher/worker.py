"""Teacher scoring: one pass over prompt + response, top-K log-probs per position.

A plain class (the Ray actor is a thin shell around it) over a backend (``teacher.backend``):
``hf`` (transformers forward pass, ``tip_ray.teacher.hf``) or ``vllm`` (prompt log-probs of an
in-process engine, ``tip_ray.teacher.vllm``). Both give the same ``TeacherSignal``: entries in
descending log-prob with ties to the lower id, and the same placeholder at padding positions
(``tip_ray.teacher.layout``). The payload is compact: int32 ids and log-probs in
``values_dtype``, as tensors, so it travels through the object store in a few buffers.

Only ids the student has a row for are sent (``teacher.student_vocab_size``): a teacher whose
embedding is padded further than the student's takes its top-K over the student's ids.
"""

from __future__ import annotations

import torch

from tip_ray.config import TeacherConfig
from tip_ray.teacher.layout import fill_padding, needed_mask, order_by_logprob
from tip_ray.tip.signal import TeacherSignal
from tip_ray.types import Generation, SamplingSettings

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TeacherWorker:
    """Scores sequences with the teacher at temperature 1."""

    def __init__(self, cfg: TeacherConfig) -> None:
        from transformers import AutoConfig

        self.cfg = cfg
        self.vocab_size = int(AutoConfig.from_pretrained(cfg.model).vocab_size)
        # The ids scored: the teacher's rows the student has too (all of them without a student size).
        self.scored_vocab = min(self.vocab_size, cfg.student_vocab_size or self.vocab_size)
        # (top_k within the student's rows is the config's check; the teacher's are known here.)
        if cfg.top_k is not None and cfg.top_k > self.scored_vocab:
            raise ValueError(f"teacher.top_k = {cfg.top_k} exceeds the teacher's vocabulary ({self.vocab_size} ids)")
        if cfg.backend == "vllm":
            from tip_ray.teacher.vllm import VLLMScorer

            self.backend = VLLMScorer(cfg, self.vocab_size, self.scored_vocab)
        else:
            from tip_ray.teacher.hf import HFScorer

            self.backend = HFScorer(cfg, self.scored_vocab)
        # The whole distribution goes dense from the hf backend (the column is the id: no ids, no
        # sort) when it covers every student id; vLLM's prompt log-probs arrive as (id, log-prob)
        # lists and keep their ids, and so does a teacher with fewer rows than the student (its
        # every id is then a top-K of the student's vocabulary).
        self.dense = (cfg.top_k is None and cfg.backend == "hf"
                      and self.scored_vocab == (cfg.student_vocab_size or self.scored_vocab))

    @property
    def k(self) -> int:
        """Teacher tokens sent per position (every scored id when ``top_k`` is null)."""
        return self.cfg.top_k or self.scored_vocab

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSettings) -> list[Generation]:
        """The teacher's own generations for token-id prompts (to measure its accuracy), one
        ``Generation`` per sample with ``prompt_index`` into ``prompt_ids``."""
        if self.cfg.backend == "vllm":
            from tip_ray.rollout.vllm import generate_with_llm

            return generate_with_llm(self.backend.llm, prompt_ids, sampling)
        from transformers import AutoTokenizer

        from tip_ray.rollout.hf import HFGenerator

        generator = HFGenerator(self.backend.model, AutoTokenizer.from_pretrained(self.cfg.model),
                                batch_size=self.cfg.micro_batch_size * 8)
        return generator.generate(prompt_ids, sampling)

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              first_position: torch.Tensor | None = None) -> TeacherSignal:
        """Signal [B, L-1, K] for right-padded sequences ``input_ids``/``attention_mask`` [B, L];
        dense (every scored id in id order, no ids) when ``top_k`` is null on the hf backend.

        Position t holds the teacher's log-probs for the token at t+1 (the student's sample),
        over ids below ``scored_vocab`` only; positions whose token t+1 is padding hold ids 0..K-1
        at log-prob -log(V) (V: ``scored_vocab``), and so do the positions before
        ``first_position`` [B] when it is given (the prompt, which the loss never reads: the hf
        backend then skips its lm_head, log-softmax and top-k there).
        """
        if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                             "must both be [B, L]")
        scored = needed_mask(attention_mask, first_position)
        dtype = _DTYPES[self.cfg.values_dtype]
        if self.dense:
            values, sampled = self.backend.logprobs(input_ids, attention_mask, first_position)
            fill_padding(None, values, sampled, scored, self.scored_vocab)
            return TeacherSignal(None, values.to(dtype), sampled.to(dtype))
        ids, values, sampled = self.backend.topk(input_ids, attention_mask, self.k, first_position)
        # Only the scored positions are ordered: fill_padding overwrites the others.
        ids[scored], values[scored] = order_by_logprob(ids[scored], values[scored])
        fill_padding(ids, values, sampled, scored, self.scored_vocab)
        return TeacherSignal(ids.to(torch.int32), values.to(dtype), sampled.to(dtype))
