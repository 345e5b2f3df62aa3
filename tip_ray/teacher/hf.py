"""The transformers teacher backend: one forward pass per micro-batch, exact log-softmax."""

from __future__ import annotations

import torch

from tip_ray.config import TeacherConfig
from tip_ray.tip.support import stable_topk_ids


def top_ids(logp: torch.Tensor, k: int) -> torch.Tensor:
    """Ids [..., k] of the k largest values of ``logp`` [..., V], ties at the k-th place going to
    the lower ids as ``stable_topk_ids`` does; the exact tie-break (which needs [..., V] int64
    work) runs only on the rows whose k-th and (k+1)-th values tie."""
    vocab = logp.shape[-1]
    if k == vocab:
        return torch.arange(vocab, device=logp.device).expand(logp.shape)
    values, ids = torch.topk(logp, k + 1, dim=-1)
    ids = ids[..., :k].contiguous()
    tied = values[..., k - 1] == values[..., k]
    if bool(tied.any()):
        ids[tied] = stable_topk_ids(logp[tied], k)
    return ids


class HFScorer:
    """A transformers causal LM scoring right-padded sequences at temperature 1."""

    def __init__(self, cfg: TeacherConfig) -> None:
        from transformers import AutoModelForCausalLM

        self.micro_batch_size = cfg.micro_batch_size
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=cfg.dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.vocab_size = int(self.model.config.vocab_size)

    @torch.no_grad()
    def topk(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For ``input_ids``/``attention_mask`` [B, L]: ids [B, L-1, k] (long) and fp32 log-probs
        [B, L-1, k] of the k most likely next tokens (ties at the k-th place to the lower id, in no
        particular order), and the fp32 log-prob [B, L-1] of the actual next token."""
        ids, values, sampled = [], [], []
        for start in range(0, input_ids.shape[0], self.micro_batch_size):
            rows = slice(start, start + self.micro_batch_size)
            logits = self.model(input_ids=input_ids[rows], attention_mask=attention_mask[rows]).logits[:, :-1]
            logp = torch.log_softmax(logits.float(), dim=-1)
            top = top_ids(logp, k)
            targets = input_ids[rows, 1:].clamp(0, self.vocab_size - 1)
            ids.append(top)
            values.append(logp.gather(-1, top))
            sampled.append(logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
        return torch.cat(ids), torch.cat(values), torch.cat(sampled)
