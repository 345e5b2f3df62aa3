"""Generation with plain transformers ``generate``: the fallback engine and the evaluator's.

Prompts and responses are token ids; a response keeps its end-of-turn token when it stopped on
one, and carries the log-prob of every sampled token under the sampling distribution.
"""

from __future__ import annotations

import torch

from tip_ray.devices import to_device
from tip_ray.types import Generation, SamplingSettings


class HFGenerator:
    """Batched generation from a ``transformers`` causal LM (left padding, KV cache).

    Runs where the model's parameters are (the caller places the model); prompts are moved
    there, generations come back as Python lists.
    """

    def __init__(self, model, tokenizer, batch_size: int = 256) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eos_ids = self._eos_ids(tokenizer, model)

    @staticmethod
    def _eos_ids(tokenizer, model) -> list[int]:
        ids = {tokenizer.eos_token_id}
        config_eos = getattr(model.generation_config, "eos_token_id", None)
        if isinstance(config_eos, int):
            ids.add(config_eos)
        elif config_eos:
            ids.update(config_eos)
        return sorted(i for i in ids if i is not None)

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are (and where generation runs)."""
        return next(self.model.parameters()).device

    @torch.no_grad()
    def update_weights(self, named_tensors: dict[str, torch.Tensor]) -> None:
        """Load a full set of Hugging Face-named weights (any device and dtype; copied into the
        model's own device and dtype) into the model (strict)."""
        self.model.load_state_dict(named_tensors, strict=True)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingSettings) -> list[Generation]:
        """``sampling.n`` generations per prompt, ordered prompt by prompt."""
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        was_training = self.model.training
        self.model.eval()
        requests = [(i, p) for i, p in enumerate(prompts) for _ in range(sampling.n)]
        out: list[Generation] = []
        try:
            for start in range(0, len(requests), self.batch_size):
                out.extend(self._generate_batch(requests[start : start + self.batch_size], sampling))
        finally:
            self.model.train(was_training)
        return out

    def _generate_batch(self, requests: list[tuple[int, list[int]]], sampling: SamplingSettings) -> list[Generation]:
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for _, p in requests)
        input_ids = torch.full((len(requests), width), pad, dtype=torch.long)
        attention = torch.zeros((len(requests), width), dtype=torch.long)
        for row, (_, prompt) in enumerate(requests):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention[row, width - len(prompt) :] = 1
        greedy = sampling.temperature == 0
        input_ids, attention = to_device((input_ids, attention), self.device)
        result = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None,
            eos_token_id=self.eos_ids,
            pad_token_id=pad,
            return_dict_in_generate=True,
            output_scores=sampling.logprobs,
        )
        new_tokens = result.sequences[:, width:].cpu()
        if sampling.logprobs:
            logprobs = torch.stack(
                [torch.log_softmax(s.float(), -1).gather(-1, new_tokens[:, i : i + 1].to(s.device)).squeeze(-1).cpu()
                 for i, s in enumerate(result.scores)],
                dim=1,
            )
        generations = []
        for row, (index, _) in enumerate(requests):
            ids = new_tokens[row].tolist()
            stop = next((j for j, t in enumerate(ids) if t in self.eos_ids), None)
            keep = len(ids) if stop is None else stop + 1
            generations.append(
                Generation(index, ids[:keep], logprobs[row, :keep].tolist() if sampling.logprobs else [],
                           "length" if stop is None else "stop")
            )
        return generations
