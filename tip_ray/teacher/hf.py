"""The transformers teacher backend: one forward pass per micro-batch, exact log-softmax."""

from __future__ import annotations

import inspect

import torch

from tip_ray.config import TeacherConfig
from tip_ray.devices import compute_device, to_device
from tip_ray.tip.support import stable_topk_ids


class HFScorer:
    """A transformers causal LM scoring right-padded sequences at temperature 1.

    The model runs on this actor's GPU when one is visible (``tip_ray.devices``), in
    ``teacher.dtype`` (``auto``: the checkpoint's ``torch_dtype``), else on the CPU. The top-K is
    taken over the first ``scored_vocab`` ids (the student's rows; None: every row), from the
    log-softmax over every row.
    """

    def __init__(self, cfg: TeacherConfig, scored_vocab: int | None = None) -> None:
        from transformers import AutoModelForCausalLM

        self.micro_batch_size = cfg.micro_batch_size
        self.device = compute_device()
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=cfg.dtype).to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.vocab_size = int(self.model.config.vocab_size)
        self.scored_vocab = min(scored_vocab or self.vocab_size, self.vocab_size)
        # transformers' causal LMs take logits_to_keep (the lm_head on the last n positions only);
        # a remote-code model without it gets every position's logits.
        self.keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    @torch.no_grad()
    def topk(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int,
        first_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For right-padded ``input_ids``/``attention_mask`` [B, L] on the CPU: ids [B, L-1, k]
        (long) and fp32 log-probs [B, L-1, k] of the k most likely next tokens among the first
        ``scored_vocab`` ids (ties at the k-th place to the lower id, in no particular order;
        log-probs normalised over the whole vocabulary), and the fp32 log-prob [B, L-1] of the
        actual next token, all on the CPU. Each micro-batch runs on the model's device.
        Positions whose target is padding hold zeros (the caller fills them), and so may the
        positions before ``first_position`` [B]: a micro-batch's lm_head, log-softmax and top-k
        start at the earliest first position of its rows (the backbone still reads the prompt)."""
        batch, length = input_ids.shape
        ids = torch.zeros(batch, length - 1, k, dtype=torch.long)
        values = torch.zeros(batch, length - 1, k)
        sampled = torch.zeros(batch, length - 1)
        # Micro-batches of similar lengths, each cut to its longest row: no compute on the batch's
        # padding columns (right padding, causal attention: real positions are unchanged).
        lengths = attention_mask.sum(-1)
        order = torch.argsort(lengths, descending=True, stable=True)
        for start in range(0, batch, self.micro_batch_size):
            rows = order[start : start + self.micro_batch_size]
            width = int(lengths[rows].max())
            if width < 2:
                continue
            first = 0 if first_position is None or not self.keeps_logits else min(
                int(first_position[rows].min()), width - 2)
            tokens, mask = to_device((input_ids[rows, :width], attention_mask[rows, :width]), self.device)
            # logits_to_keep = n: the lm_head runs on the last n positions, first .. width - 1.
            extra = {"logits_to_keep": width - first} if self.keeps_logits else {}
            logits = self.model(input_ids=tokens, attention_mask=mask, **extra).logits[:, :-1]
            logp = torch.log_softmax(logits.float(), dim=-1)
            top = stable_topk_ids(logp[..., : self.scored_vocab], k)
            targets = tokens[:, first + 1 :].clamp(0, self.vocab_size - 1)
            ids[rows, first : width - 1] = top.cpu()
            values[rows, first : width - 1] = logp.gather(-1, top).cpu()
            sampled[rows, first : width - 1] = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
        return ids, values, sampled
