"""Generation with plain transformers ``generate``: the fallback engine and the evaluator's.

Prompts and responses are token ids; a response keeps its end-of-turn token when it stopped on
one, and carries the log-prob of every sampled token under the sampling distribution.

Sampling is seeded per sample, as the vLLM engine seeds per prompt: sample j of a prompt with
seed s draws its tokens from its own generator (``sample_seed(s, j)``), so what a prompt samples
does not depend on which other prompts share its call or its batch (up to the floating-point
differences that batching with padding makes in the logits). transformers' ``generate`` samples
a whole batch from the global generator, so the draw is done here instead, by the exponential
race (Gumbel-max): ``argmax_v p_v / E_v`` with ``E_v ~ Exp(1)`` from the row's generator is a
sample of ``p``, and ``generate`` then decodes greedily over the noised scores.
"""

from __future__ import annotations

import hashlib

import torch
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from tip_ray.devices import to_device
from tip_ray.types import Generation, SamplingSettings

_SAMPLE_STRIDE = 1_000_003  # seeds of one prompt's samples: s * stride + j, distinct while n < stride


def call_seeds(seed: int, count: int) -> list[int]:
    """``count`` distinct-looking 31-bit prompt seeds derived from one call seed: the prompt at
    place i of a call gets ``call_seeds(seed, n)[i]``."""
    return [int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=4).digest(), "little") & 0x7FFF_FFFF
            for i in range(count)]


def sample_seed(prompt_seed: int, sample: int) -> int:
    """The generator seed of sample ``sample`` (0-based) of a prompt seeded ``prompt_seed`` (>= 0)."""
    if prompt_seed < 0 or not 0 <= sample < _SAMPLE_STRIDE:
        raise ValueError(f"need prompt_seed >= 0 and 0 <= sample < {_SAMPLE_STRIDE}, got {prompt_seed}, {sample}")
    return prompt_seed * _SAMPLE_STRIDE + sample


class SeededSampler(LogitsProcessor):
    """A transformers logits processor that samples every row from its own generator.

    Applies the temperature and top-p warpers transformers' sampling would apply, then adds the
    exponential-race noise of each row's generator (one ``[V]`` draw per row and step), so that
    greedy decoding over the returned scores picks a sample of the warped distribution.
    ``logprobs`` collects, per step, the log-prob [rows] of the chosen token under that
    distribution (when ``record``). Runs on the scores' device; generators live there too.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: torch.device,
                 record: bool) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        self.warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))
        self.record = record
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Noised scores [rows, V] whose argmax is each row's sample (``scores`` [rows, V])."""
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        logp = torch.log_softmax(scores.float(), dim=-1)
        race = torch.empty_like(logp)
        for row, generator in enumerate(self.generators):
            race[row].exponential_(generator=generator)
        noised = logp - race.log()
        if self.record:
            self.logprobs.append(logp.gather(-1, noised.argmax(-1, keepdim=True)).squeeze(-1))
        return noised


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
    def generate(self, prompts: list[list[int]], sampling: SamplingSettings,
                 seeds: list[int] | None = None) -> list[Generation]:
        """``sampling.n`` generations per prompt (``prompts`` [N][len_i]), ordered prompt by prompt.

        ``seeds`` [N]: prompt i's samples come from generators seeded ``sample_seed(seeds[i], j)``,
        whatever else the call holds. None: prompt i gets ``call_seeds(sampling.seed, N)[i]`` (its
        samples then depend on its place in the call, but two prompts never share their noise, as
        they would under one seed: vLLM's engine seeds every request with ``sampling.seed``), or,
        when ``sampling.seed`` is None too, a call seed drawn from torch's global generator.
        Greedy ignores seeds.
        """
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
        if seeds is None:
            base = sampling.seed if sampling.seed is not None else int(torch.randint(2**31 - 1, ()).item())
            seeds = call_seeds(base, len(prompts))
        was_training = self.model.training
        self.model.eval()
        requests = [(i, p, sample_seed(seeds[i], j)) for i, p in enumerate(prompts) for j in range(sampling.n)]
        out: list[Generation] = []
        try:
            for start in range(0, len(requests), self.batch_size):
                out.extend(self._generate_batch(requests[start : start + self.batch_size], sampling))
        finally:
            self.model.train(was_training)
        return out

    def _generate_batch(self, requests: list[tuple[int, list[int], int]],
                        sampling: SamplingSettings) -> list[Generation]:
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for _, p, _ in requests)
        input_ids = torch.full((len(requests), width), pad, dtype=torch.long)
        attention = torch.zeros((len(requests), width), dtype=torch.long)
        for row, (_, prompt, _) in enumerate(requests):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention[row, width - len(prompt) :] = 1
        greedy = sampling.temperature == 0
        input_ids, attention = to_device((input_ids, attention), self.device)
        sampler = None if greedy else SeededSampler([seed for _, _, seed in requests], sampling.temperature,
                                                    sampling.top_p, self.device, sampling.logprobs)
        # Greedy decoding either way: over the model's scores, or over the sampler's noised ones.
        result = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=sampling.max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            logits_processor=None if sampler is None else LogitsProcessorList([sampler]),
            eos_token_id=self.eos_ids,
            pad_token_id=pad,
            return_dict_in_generate=True,
            output_scores=greedy and sampling.logprobs,
        )
        new_tokens = result.sequences[:, width:].cpu()
        if sampling.logprobs and sampler is not None:
            logprobs = torch.stack(sampler.logprobs, dim=1).cpu() if sampler.logprobs else torch.zeros(len(requests), 0)
        elif sampling.logprobs:
            logprobs = torch.stack(
                [torch.log_softmax(s.float(), -1).gather(-1, new_tokens[:, i : i + 1].to(s.device)).squeeze(-1).cpu()
                 for i, s in enumerate(result.scores)],
                dim=1,
            )
        generations = []
        for row, (index, _, _) in enumerate(requests):
            ids = new_tokens[row].tolist()
            stop = next((j for j, t in enumerate(ids) if t in self.eos_ids), None)
            keep = len(ids) if stop is None else stop + 1
            generations.append(
                Generation(index, ids[:keep], logprobs[row, :keep].tolist() if sampling.logprobs else [],
                           "length" if stop is None else "stop")
            )
        return generations
