"""Pools that survive their actors: a hung actor is killed, restarted and its shard retried; an
actor out of restarts is retired; a training run goes on through a SIGKILLed rollout actor and a
SIGKILLed teacher actor, and the restarted rollout actor serves the current weights."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tip_ray.config import FaultConfig
from tip_ray.data.tasks import make_splits, write_jsonl

pytestmark = pytest.mark.slow
ASSETS = Path(__file__).resolve().parents[2] / "tip_ray" / "embedded" / "assets"


@pytest.fixture(scope="module")
def cluster():
    import ray

    # The test actor class below lives in this module, which Ray workers cannot import.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


class Squarer:
    """A pool actor that squares its rows; the actors in ``hang`` block on their first call
    (every call when ``forever``), as a wedged engine would."""

    def __init__(self, index: int, markers: str, hang: tuple[int, ...], forever: bool) -> None:
        self.marker = Path(markers) / f"hung-{index}"
        self.hangs = index in hang and (forever or not self.marker.exists())

    def work(self, rows: list[int]) -> list[int]:
        if self.hangs:
            self.marker.touch()
            time.sleep(3600)
        return [r * r for r in rows]


def squarer_pool(tmp_path: Path, faults: FaultConfig, events: list[str], actors: int = 2, hang: tuple[int, ...] = (),
                 forever: bool = False):
    from tip_ray.runtime.placement import PoolResources
    from tip_ray.runtime.pools import ActorPool

    return ActorPool(PoolResources("squarer", actors, cpus=0.5), Squarer, lambda i: (i, str(tmp_path), hang, forever),
                     faults, events.append)


def square(pool, n: int) -> list[int]:
    parts = pool.finish(pool.start([1.0] * n, lambda rows: (rows,), lambda actor, rows: actor.work.remote(rows)))
    out = [0] * n
    for rows, values in parts:
        for row, value in zip(rows, values):
            out[row] = value
    return out


def pid(actor) -> int:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def test_a_hung_actor_is_killed_restarted_and_its_shard_retried(cluster, tmp_path):
    events: list[str] = []
    pool = squarer_pool(tmp_path, FaultConfig(actor_timeout_s=2.0, max_step_retries=2), events, hang=(1,))
    try:
        start = time.monotonic()
        assert square(pool, 9) == [i * i for i in range(9)]
        assert time.monotonic() - start >= 2.0
        assert len(events) == 1, events
        assert "squarer pool: actor 1 did not answer within faults.actor_timeout_s=2 s" in events[0]
        assert "restarted, retry 1/2" in events[0]
        assert square(pool, 5) == [i * i for i in range(5)] and len(events) == 1  # the restarted actor serves
    finally:
        pool.close()


def test_an_actor_that_keeps_hanging_stops_the_call_naming_pool_actor_and_cause(cluster, tmp_path):
    from tip_ray.runtime.pools import PoolError

    events: list[str] = []
    pool = squarer_pool(tmp_path, FaultConfig(actor_timeout_s=2.0, max_step_retries=1), events, actors=1, hang=(0,),
                        forever=True)
    try:
        with pytest.raises(PoolError, match=r"squarer pool: actor 0 did not answer within faults.actor_timeout_s=2 s"
                                            r".*retries are used up \(faults.max_step_retries=1\)"):
            square(pool, 3)
        assert len(events) == 1 and "retry 1/1" in events[0]
    finally:
        pool.close()


def test_an_actor_out_of_restarts_is_retired_and_its_work_moves_to_the_others(cluster, tmp_path):
    events: list[str] = []
    pool = squarer_pool(tmp_path, FaultConfig(max_actor_restarts=0), events)
    try:
        assert square(pool, 4) == [0, 1, 4, 9]
        os.kill(pid(pool.actors[0]), signal.SIGKILL)  # no restart left: dead for good
        assert square(pool, 6) == [i * i for i in range(6)]
        assert pool.live == [1]
        assert any("actor 0 is gone for good" in e for e in events), events
        assert any("squarer pool: actor 0 failed" in e and "moved to actor 1" in e for e in events), events
        assert square(pool, 3) == [0, 1, 4]  # later calls go to the live actor only
    finally:
        pool.close()


class Unbuildable:
    """A pool actor whose constructor fails, as with a wrong model path."""

    def __init__(self, index: int) -> None:
        raise ValueError(f"actor {index}: no model at /nonexistent")

    def work(self, rows: list[int]) -> list[int]:
        return rows


def test_an_actor_that_cannot_be_built_fails_the_call_with_its_error_at_once(cluster):
    from tip_ray.runtime.placement import PoolResources
    from tip_ray.runtime.pools import ActorPool

    events: list[str] = []
    pool = ActorPool(PoolResources("unbuildable", 1, cpus=0.5), Unbuildable, lambda i: (i,), FaultConfig(),
                     events.append)
    try:
        with pytest.raises(cluster.exceptions.ActorDiedError, match="no model at /nonexistent"):
            square(pool, 2)
        assert events == []  # not retried: a constructor that fails fails again
    finally:
        pool.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("failures-data")
    train, test = make_splits(0, 64, 8)
    write_jsonl(train, root / "train.jsonl")
    write_jsonl(test, root / "test.jsonl")
    return root


@pytest.mark.heavy  # a training run with two actors killed: 1-1.5 minutes
def test_training_survives_a_killed_rollout_actor_and_a_killed_teacher_actor(cluster, tmp_path, data):
    from tip_ray.cli import compose
    from tip_ray.runtime.pools import sample_seeds
    from tip_ray.trainer import Trainer

    ray = cluster
    run_dir = tmp_path / "run"
    cfg = compose("train", [
        f"student={ASSETS / 'student'}", f"teacher.model={ASSETS / 'teacher'}", f"data.path={data / 'train.jsonl'}",
        f"eval_data.path={data / 'test.jsonl'}", "eval_data.limit=8", "trainer.steps=3", "trainer.prompts_per_step=8",
        "rollout.num_workers=2", "rollout.engine=vllm", "rollout.max_new_tokens=48", "teacher.num_workers=2",
        "learner.world_size=1", "learner.global_batch_size=8", "learner.micro_batch_size=4",
        "faults.actor_timeout_s=120", "logger.wandb=false", f"trainer.output_dir={run_dir}",
        "cluster.rollout.cpus=1", "cluster.teacher.cpus=1"])  # 2 + 2 + 1 actors on the fixture's 6 CPUs
    trainer = Trainer(cfg)
    try:
        rollout, teacher = trainer.rollout_pool.actors, trainer.teacher_pool.actors
        killed_rollout, killed_teacher = pid(rollout[1]), pid(teacher[0])
        steps = []
        metrics, launched = trainer.step(1, trainer._launch_next())
        steps.append(metrics)
        os.kill(killed_rollout, signal.SIGKILL)  # while it generates its share of step 2's rollouts
        metrics, launched = trainer.step(2, launched)
        steps.append(metrics)
        trainer.rollout_pool.collect(launched[1])  # step 3's rollouts are in ...
        os.kill(killed_teacher, signal.SIGKILL)  # ... so step 3's teacher call meets the dead actor
        metrics, launched = trainer.step(3, launched)
        steps.append(metrics)
        assert launched is None

        assert [m["weight_version"] for m in steps] == [1, 2, 3]
        # Step 2's retried shard came from the restarted actor with version 1 re-sent, not version 0.
        assert [m["staleness"] for m in steps] == [0, 0, 0]
        assert ray.get([a.weight_version.remote() for a in rollout]) == [3, 3]
        assert pid(rollout[1]) != killed_rollout and pid(teacher[0]) != killed_teacher
        events = [json.loads(line)["event"] for line in (run_dir / "events.jsonl").read_text().splitlines()]
        assert any(e.startswith("rollout pool: actor 1 failed") and "restarted, retry 1/" in e for e in events), events
        assert any(e.startswith("teacher pool: actor 0 failed") and "restarted, retry 1/" in e for e in events), events

        # A rollout actor that dies during a weight sync: Ray restarts it, and the sync is sent again
        # to the actors still behind (the restarted one starts from the initial weights).
        killed_at_sync = pid(rollout[0])
        os.kill(killed_at_sync, signal.SIGKILL)
        trainer._sync()
        assert trainer.version == 4 and ray.get([a.weight_version.remote() for a in rollout]) == [4, 4]
        assert pid(rollout[0]) != killed_at_sync
        events = [json.loads(line)["event"] for line in (run_dir / "events.jsonl").read_text().splitlines()]
        assert any("failed during the weight sync to version 4" in e and "retry 1/" in e for e in events), events

        # One seed per prompt: the pool's two actors sample what one actor samples alone.
        prompts = [trainer.eval_data[i].prompt_ids for i in range(6)]
        seeds = sample_seeds(0, 0, 0, len(prompts))
        pooled = trainer.rollout_pool.collect(trainer.rollout_pool.launch(prompts, seeds))
        alone = ray.get(rollout[0].generate.remote(prompts, seeds))
        assert [g.token_ids for g in pooled.generations] == [g.token_ids for g in alone.generations]
        assert 0.0 <= trainer.evaluate() <= 1.0
    finally:
        trainer.close()
