"""In-process stand-ins for the driver's runtime (``tip_ray.driver.ports``): plain Python objects
with the pools' and the learner group's typed methods, so that ``tip_ray.trainer.Trainer`` runs
its real loop (state, staleness, sync cadence, checkpoints, recovery, evaluation) without Ray.

The rollout pool samples fixed responses from the version it serves; the teacher scores them with
a seeded random teacher (``TeacherSignal.from_logits``); the learner group applies or skips updates
as a script says and keeps its "weights" (an update count and a checksum of what it trained on) in
real checkpoint files. Tests list what each learner step does; everything else is real driver code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tip_ray.learner.worker import StepMetrics
from tip_ray.sync.transports import SyncReport
from tip_ray.tip.signal import TeacherSignal
from tip_ray.types import Generation, RolloutBatch, TrainBatch

ASSETS = Path(__file__).resolve().parents[2] / "tip_ray" / "embedded" / "assets"


class RankDied(RuntimeError):
    """What the fake learner raises for a learner rank that died (``learner_lost`` recognises it)."""


@dataclass
class FakeRollouts:
    """The rollout pool: each prompt gets ``n`` responses of ``length`` tokens, from the served
    version (the last one ``eos`` when set: a closed chat turn). ``calls`` records every launch's
    prompts, seeds and sampling."""

    n: int
    length: int = 4
    served: int = 0
    eos: int | None = None
    launches: list[int] = field(default_factory=list)  # the served version at each launch
    respond: Callable[[int], list[int]] | None = None  # sample number within its prompt -> its token ids
    calls: list[tuple] = field(default_factory=list)

    def _generations(self, prompts, n: int) -> tuple[Generation, ...]:
        if self.respond is not None:
            return tuple(Generation(i, self.respond(s), [], "stop") for i in range(len(prompts)) for s in range(n))
        end = [] if self.eos is None else [self.eos]
        return tuple(Generation(i, [5 + (i + j) % 20 for j in range(self.length - len(end))] + end, [], "stop")
                     for i in range(len(prompts)) for _ in range(n))

    def launch(self, prompts, seeds, sampling=None):
        assert len(seeds) == len(prompts)
        self.launches.append(self.served)
        self.calls.append(([list(p) for p in prompts], list(seeds), sampling))
        n = self.n if sampling is None else sampling.n
        return RolloutBatch(tuple(tuple(p) for p in prompts), self._generations(prompts, n), self.served)

    def collect(self, launch: RolloutBatch) -> RolloutBatch:
        return launch

    def generate(self, prompts, sampling) -> list[Generation]:
        return [Generation(i, [5 + i % 20] * self.length, [], "stop") for i in range(len(prompts))]


@dataclass
class FakeTeacher:
    """The teacher pool: a seeded random teacher over ``vocab`` rows (more than the student's to
    send ids it cannot take), its signal cut to ``top_k``."""

    vocab: int
    top_k: int
    scored: int = 0
    seen: list = field(default_factory=list)  # the sequences [b, L] of every score call
    prompted: list = field(default_factory=list)  # the prompts of every generate call

    def score(self, input_ids, attention_mask, first_position=None) -> TeacherSignal:
        self.scored += 1
        self.seen.append(input_ids.clone())
        g = torch.Generator().manual_seed(self.scored)
        b, length = input_ids.shape
        logits = torch.randn(b, length - 1, self.vocab, generator=g)
        logits[..., -1] += 50.0  # the last row is the teacher's argmax everywhere
        return TeacherSignal.from_logits(logits, input_ids[:, 1:], self.top_k)

    def launch_score(self, input_ids, attention_mask, first_position=None) -> TeacherSignal:
        return self.score(input_ids, attention_mask, first_position)

    def collect_score(self, launch: TeacherSignal) -> TeacherSignal:
        return launch

    def score_stored(self, input_ids, attention_mask, first_position=None) -> tuple[TeacherSignal, TeacherSignal]:
        signal = self.score(input_ids, attention_mask, first_position)
        return signal, signal  # in-process: the learner takes the signal itself

    def generate(self, prompts, sampling) -> list[Generation]:
        self.prompted.append([list(p) for p in prompts])
        return [Generation(i, [7] * 3, [], "stop") for i in range(len(prompts))]


@dataclass
class FakeLearner:
    """The learner group. ``script``: one outcome per ``train_step`` call, shared with the runtime
    (it outlives a restarted group): ``ok`` (an update), ``skip`` (non-finite statistics), ``poison``
    (non-finite weights after the update), ``die`` (a rank died), ``signal`` (an update during which
    the process receives SIGTERM)."""

    script: list[str]
    world_size: int = 1
    lr: float = 1e-3
    updates: int = 0
    trained: float = 0.0  # a checksum of every batch trained on: equal runs trained on equal data
    batches: list[int] = field(default_factory=list)
    advantages: list = field(default_factory=list)  # each step's batch.advantages

    def train_step(self, batch: TrainBatch) -> tuple[list[StepMetrics], dict[str, float] | None]:
        outcome = self.script.pop(0) if self.script else "ok"
        if outcome == "die":
            raise RankDied("learner rank 0 is gone")
        if outcome == "signal":
            os.kill(os.getpid(), __import__("signal").SIGTERM)
        valid = int(batch.loss_mask.sum())
        self.advantages.append(batch.advantages)
        metrics = StepMetrics(loss=1.0, kept_tokens=valid, valid_tokens=valid, kept_fraction=1.0,
                              quadrant_shares={f"Q{i}": 0.25 for i in range(1, 5)}, entropy_mean=1.0,
                              entropy_kept_mean=1.0, rkl_mean=0.5, rkl_kept_mean=0.5, skipped=outcome == "skip",
                              reward_loss=None if batch.advantages is None else 0.25)
        if outcome == "skip":
            return [metrics] * self.world_size, None
        self.updates += 1
        self.trained += float(batch.input_ids.double().sum())
        self.batches.append(batch.size)
        return [metrics] * self.world_size, {"lr": self.lr, "grad_norm": 1.0,
                                             "weights_finite": float(outcome != "poison")}

    def evaluate_tokens(self, batch: TrainBatch) -> torch.Tensor:
        return -batch.teacher.sampled_logprobs[batch.loss_mask].double()

    def save_state(self, directory: str) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "fake.json").write_text(json.dumps({"updates": self.updates, "trained": self.trained}))

    def load_state(self, directory: str) -> int:
        saved = json.loads((Path(directory) / "fake.json").read_text())
        self.updates, self.trained = saved["updates"], saved["trained"]
        return self.updates

    def export_hf(self, directory: str) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "model.json").write_text(json.dumps({"updates": self.updates}))

    def export_weights_ref(self):
        return {"updates": self.updates}


class InProcessLearner:
    """The learner group as one real ``LearnerWorker`` rank in this process (``learner.world_size``
    1, gloo; the caller sets MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE): the real schedule,
    selection and optimizer behind the group's methods."""

    def __init__(self, cfg) -> None:
        from tip_ray.learner.worker import LearnerWorker

        self.worker = LearnerWorker(cfg.learner, cfg.selection, cfg.loss)
        self.updates = 0

    def train_step(self, batch: TrainBatch) -> tuple[list[StepMetrics], dict[str, float] | None]:
        metrics, report = self.worker.train_step(batch)
        self.updates = self.worker.steps
        return [metrics], report

    def evaluate_tokens(self, batch: TrainBatch) -> torch.Tensor:
        return self.worker.evaluate_tokens(batch)

    def save_state(self, directory: str) -> None:
        self.worker.save_state(directory)

    def load_state(self, directory: str) -> int:
        self.updates = self.worker.load_state(directory)
        return self.updates

    def export_hf(self, directory: str) -> None:
        self.worker.export_hf(directory)

    def export_weights_ref(self):
        return self.worker.export_weights()


class FakeRuntime:
    """The runtime: the three fakes above and a weight sync that moves the learner's update count
    to the rollout pool's served version (strictly increasing, as real actors insist).
    ``real_learner``: one in-process ``LearnerWorker`` rank instead of the scripted learner."""

    def __init__(self, cfg, hooks, teacher_vocab, script: list[str], teacher_rows: int | None = None,
                 real_learner: bool = False):
        from tip_ray.config import teacher_configs

        self.cfg, self.hooks, self.script = cfg, hooks, script
        self.rollout = FakeRollouts(cfg.rollout.n)
        vocabs = teacher_vocab if isinstance(teacher_vocab, dict) else {"default": teacher_vocab}  # by teacher
        self.teachers = {name: FakeTeacher(teacher_rows or vocabs[name], t.top_k or vocabs[name])
                         for name, t in teacher_configs(cfg).items()}
        self.teacher = self.teachers["default"]
        self.learner = InProcessLearner(cfg) if real_learner else FakeLearner(script, cfg.learner.world_size)
        self.syncs: list[tuple[int, int]] = []  # (version, learner updates served)
        self.restarts = 0
        self.closed = False

    def sync_weights(self, version: int) -> SyncReport:
        if version <= self.rollout.served:
            raise ValueError(f"weight version {version} is not newer than the served version {self.rollout.served}")
        self.rollout.served = version
        self.syncs.append((version, self.learner.updates))
        return SyncReport(version, 0.0, 0, "object_store", {"updates": self.learner.updates})

    def restart_learner(self) -> None:
        self.restarts += 1
        self.learner = FakeLearner(self.script, self.cfg.learner.world_size)

    def learner_lost(self, exc: BaseException) -> bool:
        return isinstance(exc, RankDied)

    def close(self) -> list:
        self.closed = True
        if isinstance(self.learner, InProcessLearner):
            self.learner.worker.close()
        return []


def write_data(root: Path) -> Path:
    """The embedded task's train and test prompts under ``root``."""
    from tip_ray.data.tasks import make_splits, write_jsonl

    train, test = make_splits(0, 64, 16)
    write_jsonl(train, root / "train.jsonl")
    write_jsonl(test, root / "test.jsonl")
    return root


def train_config(run_dir: Path, data: Path, *overrides: str):
    """A small run of the embedded pair: 4 prompts x 2 rollouts per step, 2 learner ranks."""
    from tip_ray.cli import compose

    return compose("train", [
        f"student={ASSETS / 'student'}", f"teacher.model={ASSETS / 'teacher'}", f"data.path={data / 'train.jsonl'}",
        f"eval_data.path={data / 'test.jsonl'}", "eval_data.limit=4", "trainer.steps=4", "trainer.prompts_per_step=4",
        "rollout.n=2", "learner.world_size=2", "learner.global_batch_size=8", "learner.micro_batch_size=2",
        "teacher.top_k=8", "logger.wandb=false", f"trainer.output_dir={run_dir}", *overrides])


def make_trainer(cfg, script: list[str] | None = None, teacher_rows: int | None = None, real_learner: bool = False):
    """A ``Trainer`` over a ``FakeRuntime`` (returned too) whose learner follows ``script`` (or is
    a real in-process rank: ``real_learner``)."""
    from tip_ray.trainer import Trainer

    made: list[FakeRuntime] = []

    def build(cfg, hooks, teacher_vocab):
        made.append(FakeRuntime(cfg, hooks, teacher_vocab, script if script is not None else [], teacher_rows,
                                real_learner))
        return made[0]

    trainer = Trainer(cfg, runtime=build)
    return trainer, made[0]


def events(run_dir: Path) -> list[str]:
    """The run's events.jsonl messages."""
    path = run_dir / "events.jsonl"
    return [json.loads(line)["event"] for line in path.read_text().splitlines()] if path.exists() else []


def metric_lines(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl lines that are training steps."""
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
