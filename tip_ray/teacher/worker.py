"""Teacher scoring: one forward pass over prompt + response, top-K log-probs per position.

A plain class (the Ray actor is a thin shell around it). The payload is compact: int32 ids and
log-probs in ``values_dtype``, as tensors, so it travels through the object store in a few
buffers.
"""

from __future__ import annotations

import torch

from tip_ray.config import TeacherConfig
from tip_ray.tip.signal import TeacherSignal

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TeacherWorker:
    """Scores sequences with a transformers causal LM at temperature 1."""

    def __init__(self, cfg: TeacherConfig) -> None:
        from transformers import AutoModelForCausalLM

        self.cfg = cfg
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.vocab_size = int(self.model.config.vocab_size)
        if cfg.top_k is not None and cfg.top_k > self.vocab_size:
            raise ValueError(f"teacher.top_k = {cfg.top_k} exceeds the teacher's vocabulary ({self.vocab_size})")

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TeacherSignal:
        """Signal [B, L-1, K] for right-padded sequences ``input_ids``/``attention_mask`` [B, L].

        Position t holds the teacher's log-probs for the token at t+1 (the student's sample).
        """
        k = self.cfg.top_k or self.vocab_size
        parts = []
        for start in range(0, input_ids.shape[0], self.cfg.micro_batch_size):
            ids = input_ids[start : start + self.cfg.micro_batch_size]
            mask = attention_mask[start : start + self.cfg.micro_batch_size]
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            parts.append(TeacherSignal.from_logits(logits, ids[:, 1:], None if k == self.vocab_size else k,
                                                   values_dtype=_DTYPES[self.cfg.values_dtype]))
        return TeacherSignal(
            torch.cat([p.topk_ids for p in parts]),
            torch.cat([p.topk_logprobs for p in parts]),
            torch.cat([p.sampled_logprobs for p in parts]),
        )
