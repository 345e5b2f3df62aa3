"""The rollout worker: a generation engine that knows which policy version it serves.

A plain class (the Ray actor is a thin shell around it). Every batch it returns is stamped with
the weight version that produced it, so the driver can bound and log staleness.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from tip_ray.config import RolloutConfig
from tip_ray.types import RolloutBatch, SamplingSettings


class RolloutWorker:
    """Student rollouts from vLLM (or transformers), with in-place weight updates."""

    def __init__(self, cfg: RolloutConfig, model: str, worker_index: int = 0) -> None:
        self.cfg = cfg
        self.worker_index = worker_index
        self._version = 0
        seed = cfg.seed + 1009 * worker_index
        if cfg.engine == "vllm":
            from tip_ray.rollout.vllm import VLLMEngine

            self.engine = VLLMEngine(model, cfg, seed=seed)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from tip_ray.devices import compute_device
            from tip_ray.rollout.hf import HFGenerator

            # On this actor's GPU when one is visible, in rollout.dtype (auto: the checkpoint's).
            causal_lm = AutoModelForCausalLM.from_pretrained(model, dtype=cfg.dtype).to(compute_device())
            self.engine = HFGenerator(causal_lm, AutoTokenizer.from_pretrained(model))
        self._calls = 0
        self._seed = seed
        self._torn_load: int | None = None  # the version whose load failed part-way, until a load succeeds

    @property
    def weight_version(self) -> int:
        """The policy version of the weights being served (0: the initial checkpoint)."""
        return self._version

    def generate(self, prompt_ids: list[list[int]], seeds: list[int] | None = None,
                 sampling: SamplingSettings | None = None) -> RolloutBatch:
        """``cfg.n`` samples per prompt (``prompt_ids`` [N][len_i]) with the current weights, stamped
        with their version; ``sampling`` replaces the config's sampling (e.g. greedy for evaluation).

        ``seeds`` [N], one per prompt: both engines sample each prompt with its own seed (vLLM per
        request, the hf engine per sample: ``tip_ray.rollout.hf``), so a prompt's samples do not
        depend on how the prompts were sharded over actors. None: a call seed from the worker's
        seed and call count (vLLM seeds every prompt with it; the hf engine derives one per place).
        """
        if self._torn_load is not None:
            raise RuntimeError(f"rollout worker {self.worker_index}: loading weight version {self._torn_load} failed "
                               f"part-way, so its weights are a mix of versions {self._version} and "
                               f"{self._torn_load}; it generates again after a complete weight load")
        self._calls += 1
        if seeds is not None and len(seeds) != len(prompt_ids):
            raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts; give one seed per prompt")
        if sampling is None:
            sampling = SamplingSettings(max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                                        top_p=self.cfg.top_p, n=self.cfg.n, seed=self._seed * 100_003 + self._calls,
                                        logprobs=self.cfg.logprobs)
        generations = self.engine.generate(prompt_ids, sampling, seeds)
        return RolloutBatch(tuple(tuple(p) for p in prompt_ids), tuple(generations), self._version)

    def update_weights(self, named_tensors: dict[str, torch.Tensor], version: int) -> None:
        """Serve ``named_tensors`` (full weights, Hugging Face names) as policy ``version``."""
        if version <= self._version:
            raise ValueError(f"weight version {version} is not newer than the served version {self._version}")
        with self._loading(version):
            self.engine.update_weights(named_tensors)
        self._version = version

    @contextlib.contextmanager
    def _loading(self, version: int) -> Iterator[None]:
        """Around a weight load: one that raises leaves the weights torn until a load succeeds."""
        try:
            yield
        except BaseException:
            self._torn_load = version
            raise
        self._torn_load = None

    # Collective weight sync (tip_ray.sync.transports).

    def weight_receivers(self) -> int:
        """Members this worker adds to the weight group (its engine's tensor parallel size)."""
        receivers = getattr(self.engine, "weight_receivers", None)
        if receivers is None:
            raise ValueError(f"sync.transport=collective needs rollout.engine=vllm, not {self.cfg.engine!r} "
                             "(the hf engine takes sync.transport=object_store)")
        return receivers

    def join_weight_group(
        self, plan: tuple, host: str, port: int, first_rank: int, world_size: int, backend: str, timeout_s: float
    ) -> list[int]:
        """Join the weight group at ``host:port`` with ranks ``first_rank`` onwards (see ``weight_receivers``)."""
        self.weight_receivers()
        return self.engine.join_weight_group(plan, host, port, first_rank, world_size, backend, timeout_s)

    def receive_weights(self, version: int) -> None:
        """Serve the weights broadcast now by learner rank 0 as policy ``version``.

        A version that is not newer is refused (``ValueError``) after draining the broadcast, so
        the group stays in step for the next sync.
        """
        if version <= self._version:
            self.engine.receive_weights(load=False)
            raise ValueError(f"weight version {version} is not newer than the served version {self._version}")
        with self._loading(version):
            self.engine.receive_weights(load=True)
        self._version = version

    def close_weight_group(self) -> None:
        """Leave the weight group."""
        if getattr(self.engine, "weight_receivers", None) is not None:
            self.engine.close_weight_group()
