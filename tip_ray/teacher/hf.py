"""The transformers teacher backend: one forward pass per micro-batch, exact log-softmax."""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import torch

from tip_ray.config import TeacherConfig
from tip_ray.devices import compute_device, to_device
from tip_ray.teacher.layout import needed_mask
from tip_ray.tip.support import stable_topk_ids


class HFScorer:
    """A transformers causal LM scoring right-padded sequences at temperature 1.

    The model runs on this actor's GPU when one is visible (``tip_ray.devices``), in
    ``teacher.dtype`` (``auto``: the checkpoint's ``torch_dtype``), else on the CPU. The top-K is
    taken over the first ``scored_vocab`` ids (the student's rows; None: every row), from the
    log-softmax over every row.

    The lm_head, log-softmax and top-K run on the positions that are scored only (a target that
    is not padding, at or after the row's ``first_position``): a forward pre-hook on the model's
    output embeddings hands it those rows' hidden states alone, [1, n, H], instead of every
    position of the micro-batch. Whatever the model does to its logits after the lm_head
    (softcapping, scaling) is elementwise and applies to them as it would to the whole batch.
    A model whose forward does not pass its hidden states through that module once, as
    [B, W, H], or fails on the head's [1, n, V] output (a reshape to [B, W, V], say) is scored
    the plain way (``gathers_rows`` turns false).
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
        self.head = self.model.get_output_embeddings()
        self.gathers_rows = isinstance(self.head, torch.nn.Module)

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
        run on its scored positions alone (the backbone still reads the prompt)."""
        batch, length = input_ids.shape
        ids = torch.zeros(batch, length - 1, k, dtype=torch.long)
        values = torch.zeros(batch, length - 1, k)
        sampled = torch.zeros(batch, length - 1)
        for where, logp, targets in self._micro_batches(input_ids, attention_mask, first_position):
            top = stable_topk_ids(logp[..., : self.scored_vocab], k)
            ids[where] = top.cpu()
            values[where] = logp.gather(-1, top).cpu()
            sampled[where] = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
        return ids, values, sampled

    @torch.no_grad()
    def logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, first_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``topk`` for the whole distribution, dense: fp32 log-probs [B, L-1, scored_vocab] of every
        id in id order (no ids, no sort) and of the actual next token [B, L-1], on the CPU; zeros
        where ``topk`` leaves them."""
        batch, length = input_ids.shape
        values = torch.zeros(batch, length - 1, self.scored_vocab)
        sampled = torch.zeros(batch, length - 1)
        for where, logp, targets in self._micro_batches(input_ids, attention_mask, first_position):
            values[where] = logp[..., : self.scored_vocab].cpu()
            sampled[where] = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
        return values, sampled

    def _micro_batches(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, first_position: torch.Tensor | None,
    ) -> Iterator[tuple[tuple[torch.Tensor, torch.Tensor | slice], torch.Tensor, torch.Tensor]]:
        """Per micro-batch: (where its scored positions go in the [B, L-1] outputs, their fp32
        log-softmax [..., V] and next tokens [...] on the model's device), from
        ``_scored_logprobs``."""
        batch = input_ids.shape[0]
        scored = needed_mask(attention_mask, first_position)
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
            # The positions first .. width - 2 whose next token is scored.
            needed = scored[rows, first : width - 1]
            logp, targets, local_rows, columns = self._scored_logprobs(
                input_ids[rows, :width], attention_mask[rows, :width], first, needed)
            yield (rows if local_rows is None else rows[local_rows], columns), logp, targets

    def _scored_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, first: int, needed: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | slice]:
        """One micro-batch ([b, W] on the CPU; ``needed`` [b, W - 1 - first], the positions from
        ``first`` on to score): the fp32 log-softmax of the positions computed, on the model's
        device, their next tokens, and where they go in the micro-batch's rows of the [B, L-1]
        outputs: with the row gather [n, V], [n], then the rows [n] and positions [n] (CPU) of
        the n positions to score; else [b, W - 1 - first, V], [b, W - 1 - first], None (every
        row) and the slice of every position from ``first``."""
        tokens, mask = to_device((input_ids, attention_mask), self.device)
        width = tokens.shape[1]
        # logits_to_keep = n: the lm_head runs on the last n positions, first .. width - 1.
        extra = {"logits_to_keep": width - first} if self.keeps_logits else {}
        if self.gathers_rows:
            # The last kept position predicts past the sequence: never scored.
            keep = torch.cat([needed, needed.new_zeros(needed.shape[0], 1)], dim=1).to(self.device)
            seen: list[tuple[int, ...]] = []

            def only_scored_rows(_module, args):
                seen.append(tuple(args[0].shape[:2]))
                if seen[-1] != tuple(keep.shape):
                    return None  # not the [b, W, H] states this gather expects: left as they are
                return (args[0][keep].unsqueeze(0), *args[1:])

            handle = self.head.register_forward_pre_hook(only_scored_rows)
            try:
                logits = self.model(input_ids=tokens, attention_mask=mask, **extra).logits
            except RuntimeError:
                if not seen:  # it failed before the head: not the gather's doing
                    raise
                logits = None  # e.g. a forward that reshapes the head's output to [b, W, V]
            finally:
                handle.remove()
            n = int(keep.sum())
            if logits is not None and seen == [tuple(keep.shape)] and tuple(logits.shape[:2]) == (1, n):
                batch_rows, positions = needed.nonzero(as_tuple=True)
                targets = tokens[batch_rows.to(self.device), (positions + first + 1).to(self.device)]
                return (torch.log_softmax(logits[0].float(), dim=-1), targets.clamp(0, self.vocab_size - 1),
                        batch_rows, positions + first)
            # The model's forward did not hand its states to the head once, as [b, W, H]: the
            # plain path from now on (the micro-batch runs again, whole).
            self.gathers_rows = False
        logits = self.model(input_ids=tokens, attention_mask=mask, **extra).logits[:, :-1]
        targets = tokens[:, first + 1 :].clamp(0, self.vocab_size - 1)
        return torch.log_softmax(logits.float(), dim=-1), targets, None, slice(first, width - 1)
