"""The driver: prompts -> rollout pool -> teacher pool -> learner group -> weight sync.

One step (synchronous mode)::

    prompts   = next(stream)                          the data cursor advances
    rollouts  = rollout pool.generate(prompts)         waits for every rollout actor
    sequences = rollouts.to_sequences()                right-padded prompt + response
    signal    = teacher pool.score(sequences)          waits for every teacher actor
    metrics   = learner group.train_step(shards)       statistics, global selection, step
    sync_weights(learner -> rollout pool, version+1)   every ``trainer.sync_every`` steps

Evaluation runs on the rollout engines (greedy) and is graded in the driver.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tip_ray.config import TrainConfig


@dataclass(frozen=True)
class TrainSummary:
    """What a finished run reports."""

    accuracy_before: float | None
    accuracy_after: float | None
    kept_fraction: float
    tokens_per_second: float
    phase_seconds: dict[str, float]
    run_dir: Path
    steps: int


def _split(items: list, parts: int) -> list[list]:
    """Contiguous, nearly equal slices (the order of ``items`` is kept)."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + size + (1 if i < extra else 0)
        out.append(items[start:stop])
        start = stop
    return out


class Trainer:
    """Builds the pools on Ray and runs the loop."""

    def __init__(self, cfg: TrainConfig) -> None:
        import ray
        from omegaconf import OmegaConf

        from tip_ray.checkpoints import check_same_vocabulary, load_tokenizer, require_checkpoint
        from tip_ray.data.prompts import PromptStream, load_prompt_dataset
        from tip_ray.groups import (
            LearnerGroup,
            PoolResources,
            RolloutActor,
            TeacherActor,
            check_fits,
            on_bundle,
            reserve,
        )
        from tip_ray.tracking import Tracker

        self.cfg = cfg
        require_checkpoint(cfg.student, "student")
        require_checkpoint(cfg.teacher.model, "teacher")
        self.tokenizer = load_tokenizer(cfg.student, "student")
        check_same_vocabulary(self.tokenizer, load_tokenizer(cfg.teacher.model, "teacher"), cfg.student,
                              cfg.teacher.model)
        self.train_data = load_prompt_dataset(cfg.data, self.tokenizer)
        self.eval_data = load_prompt_dataset(cfg.eval_data, self.tokenizer) if cfg.eval_data else None
        self.stream = PromptStream(self.train_data, cfg.trainer.prompts_per_step, seed=cfg.data.seed,
                                   shuffle=cfg.data.shuffle)

        c = cfg.cluster
        pools = {
            "rollout": PoolResources("rollout", cfg.rollout.num_workers, c.rollout_cpus, c.rollout_gpus,
                                     strategy=c.placement_strategy),
            "teacher": PoolResources("teacher", cfg.teacher.num_workers, c.teacher_cpus, c.teacher_gpus,
                                     strategy=c.placement_strategy),
            "learner": PoolResources("learner", cfg.learner.world_size, c.learner_cpus, c.learner_gpus,
                                     strategy=c.placement_strategy),
        }
        if not ray.is_initialized():
            ray.init(address=c.address, num_cpus=c.num_cpus, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}})
        check_fits(list(pools.values()), ray.cluster_resources())

        self.run_dir = Path(cfg.trainer.output_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resolved = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
        (self.run_dir / "config.json").write_text(json.dumps(resolved, indent=2))
        self.tracker = Tracker(cfg.logger, self.run_dir, resolved)

        groups = {name: reserve(pool) for name, pool in pools.items() if name != "learner"}
        self.rollout = [
            ray.remote(RolloutActor).options(num_cpus=c.rollout_cpus, num_gpus=c.rollout_gpus,
                                             scheduling_strategy=on_bundle(groups["rollout"], i))
            .remote(cfg.rollout, cfg.student, i)
            for i in range(cfg.rollout.num_workers)
        ]
        self.teacher = [
            ray.remote(TeacherActor).options(num_cpus=c.teacher_cpus, num_gpus=c.teacher_gpus,
                                             scheduling_strategy=on_bundle(groups["teacher"], i))
            .remote(cfg.teacher)
            for i in range(cfg.teacher.num_workers)
        ]
        self.learner = LearnerGroup(pools["learner"], cfg.learner, cfg.selection, cfg.loss)
        self.version = 0

    # -------------------------------------------------------------------------------------------

    def _generate(self, prompt_ids: list[list[int]]):
        import ray

        from tip_ray.types import RolloutBatch

        shards = [s for s in _split(prompt_ids, len(self.rollout))]
        results = ray.get([a.generate.remote(s) for a, s in zip(self.rollout, shards) if s])
        prompts, generations, offset = [], [], 0
        for r in results:
            prompts.extend(r.prompt_ids)
            generations.extend(type(g)(g.prompt_index + offset, g.token_ids, g.logprobs, g.finish_reason)
                               for g in r.generations)
            offset += len(r.prompt_ids)
        return RolloutBatch(tuple(prompts), tuple(generations), min(r.policy_version for r in results))

    def _score(self, input_ids, attention):
        import ray
        import torch

        from tip_ray.tip.signal import TeacherSignal

        rows = _split(list(range(input_ids.shape[0])), len(self.teacher))
        refs = [a.score.remote(input_ids[r[0] : r[-1] + 1], attention[r[0] : r[-1] + 1])
                for a, r in zip(self.teacher, rows) if r]
        parts = ray.get(refs)
        return TeacherSignal(torch.cat([p.topk_ids for p in parts]), torch.cat([p.topk_logprobs for p in parts]),
                             torch.cat([p.sampled_logprobs for p in parts]))

    def evaluate(self) -> float | None:
        """Greedy accuracy of the served student on the eval prompts (graded in the driver)."""
        import ray

        from tip_ray.data.grading import accuracy_with_ci, get_grader
        from tip_ray.rollout.hf import SamplingSettings

        if self.eval_data is None:
            return None
        examples = [self.eval_data[i] for i in range(len(self.eval_data))]
        sampling = SamplingSettings(max_new_tokens=self.cfg.trainer.eval_max_new_tokens, temperature=0.0)
        shards = _split(examples, len(self.rollout))
        results = ray.get([a.generate_with.remote([e.prompt_ids for e in s], sampling)
                           for a, s in zip(self.rollout, shards) if s])
        grade = get_grader(self.cfg.grader)
        correct = []
        for shard, gens in zip([s for s in shards if s], results):
            for g in gens:
                text = self.tokenizer.decode(g.token_ids, skip_special_tokens=True)
                correct.append(bool(grade(text, shard[g.prompt_index].answer)))
        return accuracy_with_ci(correct)[0]

    def step(self, step: int) -> dict[str, float]:
        """One synchronous step; returns the metrics it logged."""
        from tip_ray.sync import sync_weights
        from tip_ray.types import TrainBatch

        times: dict[str, float] = {}
        t = time.perf_counter()
        batch = next(self.stream)
        rollouts = self._generate(batch.prompt_ids)
        times["rollout"] = time.perf_counter() - t

        t = time.perf_counter()
        input_ids, attention, loss_mask = rollouts.to_sequences(self.tokenizer.pad_token_id)
        signal = self._score(input_ids, attention)
        times["teacher"] = time.perf_counter() - t

        t = time.perf_counter()
        train = TrainBatch(input_ids, attention, loss_mask, signal, rollouts.policy_version)
        world = self.cfg.learner.world_size
        per_rank = train.size // world
        metrics, stepped = self.learner.train_step([train.rows(r * per_rank, (r + 1) * per_rank)
                                                    for r in range(world)])
        times["learner"] = time.perf_counter() - t

        t = time.perf_counter()
        sync_seconds = 0.0
        if step % self.cfg.trainer.sync_every == 0:
            self.version += 1
            sync_seconds = sync_weights(self.learner, self.rollout, self.version).seconds
        times["sync"] = time.perf_counter() - t

        m = metrics[0]
        response_tokens = int(loss_mask.sum())
        lengths = [len(g.token_ids) for g in rollouts.generations]
        out = {
            "loss": m.loss, "kept_fraction": m.kept_fraction, "kept_tokens": m.kept_tokens,
            "valid_tokens": m.valid_tokens, "entropy_mean": m.entropy_mean, "entropy_kept_mean": m.entropy_kept_mean,
            "rkl_mean": m.rkl_mean, "rkl_kept_mean": m.rkl_kept_mean, "learner_peak_memory_mb": m.peak_memory_bytes / 2**20,
            **{f"quadrant/{k}": v for k, v in m.quadrant_shares.items()},
            "response_length": sum(lengths) / len(lengths),
            "truncated": sum(g.finish_reason == "length" for g in rollouts.generations),
            "tokens_per_second": response_tokens / sum(times.values()),
            **{f"time/{k}": v for k, v in times.items()}, "sync_seconds": sync_seconds,
            "lr": stepped["lr"], "grad_norm": stepped["grad_norm"], "weight_version": self.version,
            "staleness": self.version - rollouts.policy_version - (1 if sync_seconds else 0),
            "epoch": batch.epoch,
        }
        return out

    def fit(self) -> TrainSummary:
        """Evaluate, run ``trainer.steps`` steps (evaluating every ``eval_every``), evaluate."""
        cfg = self.cfg.trainer
        before = self.evaluate()
        self.tracker.log(0, {"eval/accuracy": before} if before is not None else {})
        kept, tokens, seconds = [], 0, 0.0
        phases: dict[str, float] = {}
        for step in range(1, cfg.steps + 1):
            metrics = self.step(step)
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                metrics["eval/accuracy"] = self.evaluate()
            self.tracker.log(step, metrics)
            kept.append(metrics["kept_fraction"])
            tokens += metrics["valid_tokens"]
            for k in ("rollout", "teacher", "learner", "sync"):
                phases[k] = phases.get(k, 0.0) + metrics[f"time/{k}"]
        seconds = sum(phases.values())
        after = self.evaluate()
        self.tracker.log(cfg.steps, {"eval/accuracy": after} if after is not None else {})
        summary = TrainSummary(before, after, sum(kept) / max(1, len(kept)), tokens / max(seconds, 1e-9),
                               {k: v / cfg.steps for k, v in phases.items()}, self.run_dir, cfg.steps)
        (self.run_dir / "summary.json").write_text(json.dumps({**asdict(summary), "run_dir": str(self.run_dir)},
                                                              indent=2))
        return summary

    def close(self) -> None:
        """Finish tracking and shut Ray down (no actor outlives the run)."""
        import ray

        self.tracker.close()
        self.learner.close()
        ray.shutdown()
