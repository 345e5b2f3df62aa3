"""The rollout worker: a generation engine that knows which policy version it serves.

A plain class (the Ray actor is a thin shell around it). Every batch it returns is stamped with
the weight version that produced it, so the driver can bound and log staleness.
"""

from __future__ import annotations

import torch

from tip_ray.config import RolloutConfig
from tip_ray.rollout.hf import SamplingSettings
from tip_ray.types import RolloutBatch


class RolloutWorker:
    """Student rollouts from vLLM (or transformers), with in-place weight updates."""

    def __init__(self, cfg: RolloutConfig, model: str, worker_index: int = 0) -> None:
        self.cfg = cfg
        self.worker_index = worker_index
        self._version = 0
        seed = cfg.seed + 1009 * worker_index
        if cfg.engine == "vllm":
            from tip_ray.rollout.vllm import VLLMEngine

            self.engine = VLLMEngine(model, dtype=cfg.dtype, max_model_len=cfg.max_model_len, seed=seed,
                                     tensor_parallel_size=cfg.tensor_parallel_size,
                                     gpu_memory_utilization=cfg.gpu_memory_utilization)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from tip_ray.rollout.hf import HFGenerator

            self.engine = HFGenerator(AutoModelForCausalLM.from_pretrained(model), AutoTokenizer.from_pretrained(model))
        self._calls = 0
        self._seed = seed

    @property
    def weight_version(self) -> int:
        """The policy version of the weights being served (0: the initial checkpoint)."""
        return self._version

    def generate(self, prompt_ids: list[list[int]]) -> RolloutBatch:
        """``cfg.n`` samples per prompt with the current weights, stamped with their version."""
        self._calls += 1
        sampling = SamplingSettings(max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                                    top_p=self.cfg.top_p, n=self.cfg.n, seed=self._seed * 100_003 + self._calls)
        generations = self.engine.generate(prompt_ids, sampling)
        return RolloutBatch(tuple(tuple(p) for p in prompt_ids), tuple(generations), self._version)

    def update_weights(self, named_tensors: dict[str, torch.Tensor], version: int) -> None:
        """Serve ``named_tensors`` (full weights, Hugging Face names) as policy ``version``."""
        if version <= self._version:
            raise ValueError(f"weight version {version} is not newer than the served version {self._version}")
        self.engine.update_weights(named_tensors)
        self._version = version
