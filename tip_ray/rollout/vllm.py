"""Generation with vLLM: the production rollout engine (the CPU build on machines without a GPU).

Weights are updated in place through the worker extension, and the prefix cache is reset so
that no key/value computed with old weights is reused.
"""

from __future__ import annotations

import os

import torch

from tip_ray.config import RolloutConfig
from tip_ray.rollout.vllm_args import engine_kwargs, on_cpu_build
from tip_ray.types import Generation, SamplingSettings


def generate_with_llm(llm, prompts: list[list[int]], sampling: SamplingSettings,
                      seeds: list[int] | None = None) -> list[Generation]:
    """Generations of a ``vllm.LLM`` for token-id ``prompts`` (see ``VLLMEngine.generate``)."""
    from vllm import SamplingParams

    def params(seed: int | None) -> SamplingParams:
        # Token ids only: incremental detokenization costs about a third of a small model's decode step.
        return SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                              max_tokens=sampling.max_new_tokens, seed=seed,
                              logprobs=0 if sampling.logprobs else None, detokenize=False)

    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
    per_request = params(sampling.seed) if seeds is None else [params(seed) for seed in seeds]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], per_request, use_tqdm=False)
    generations = []
    for index, request in enumerate(outputs):
        for completion in request.outputs:
            ids = list(completion.token_ids)
            logprobs = [float(step[token].logprob) for step, token in zip(completion.logprobs or [], ids)]
            finish = "stop" if completion.finish_reason == "stop" else "length"
            generations.append(Generation(index, ids, logprobs, finish))
    return generations


class VLLMEngine:
    """An in-process ``vllm.LLM`` behind the engine interface ``generate`` / ``update_weights``."""

    def __init__(self, model: str, cfg: RolloutConfig, seed: int = 0) -> None:
        """Start the engine for the checkpoint at ``model`` as ``cfg`` sizes it
        (``tip_ray.rollout.vllm_args``); ``ValueError`` before loading when the KV cache the run
        needs does not fit the NUMA node's memory (CPU build)."""
        # In-process engine core: weights and requests stay in this actor's process.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        on_cpu = on_cpu_build()
        eager = on_cpu if cfg.enforce_eager is None else cfg.enforce_eager
        self.llm = LLM(
            **engine_kwargs(cfg, model, "rollout", on_cpu),
            seed=seed,
            enforce_eager=eager,
            worker_extension_cls="tip_ray.rollout.vllm_extension.WeightUpdateExtension",
        )

    def generate(self, prompts: list[list[int]], sampling: SamplingSettings,
                 seeds: list[int] | None = None) -> list[Generation]:
        """``sampling.n`` generations per prompt, prompt by prompt, with sampled-token log-probs.

        ``seeds`` [len(prompts)]: each prompt is sampled with its own seed, so its samples do not
        depend on which other prompts share the batch; None: one ``sampling.seed`` for the call.
        """
        return generate_with_llm(self.llm, prompts, sampling, seeds)

    def update_weights(self, named_tensors: dict[str, torch.Tensor]) -> None:
        """Load the learner's full weights (Hugging Face names) into the running engine."""
        self.llm.collective_rpc("tip_ray_load_weights", args=(list(named_tensors.items()),))
        self.llm.reset_prefix_cache()

    # Collective weight sync (tip_ray.sync.transports): every vLLM worker is one member of the weight group.

    @property
    def weight_receivers(self) -> int:
        """Members this engine adds to the weight group: one per vLLM worker (tensor parallel rank)."""
        return self.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size

    def join_weight_group(
        self, plan: tuple, host: str, port: int, first_rank: int, world_size: int, backend: str, timeout_s: float
    ) -> list[int]:
        """Every worker joins the weight group at ``host:port`` (ranks ``first_rank`` onwards);
        returns the ranks taken."""
        return self.llm.collective_rpc("tip_ray_join_weight_group",
                                       args=(plan, host, port, first_rank, world_size, backend, timeout_s))

    def receive_weights(self, load: bool = True) -> int:
        """Take part in one weight broadcast: load the weights as they arrive (``load``) or only
        drain them; the prefix cache is reset after a load. Returns the tensors each worker received."""
        counts = self.llm.collective_rpc("tip_ray_receive_weights", args=(load,))
        if load:
            self.llm.reset_prefix_cache()
        return counts[0]

    def close_weight_group(self) -> None:
        """Every worker leaves the weight group."""
        self.llm.collective_rpc("tip_ray_close_weight_group")
