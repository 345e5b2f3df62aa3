"""Multi-node placement, simulated on one machine: a Ray head and three worker nodes started with
``ray.cluster_utils.Cluster``, each node advertising its own CPUs and a custom resource
(``rollout_node``, ``teacher_node``, ``learner_node``). ``tip_ray.trainer.Trainer`` joins the
cluster through ``cluster.address`` and pins each pool with ``cluster.<pool>.resources``; the test
checks that every pool's bundles and actors landed on the node meant for it and that two real
training steps (transformers rollouts, teacher scoring, a 2-rank DeepSpeed learner, weight sync)
complete there."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from tip_ray.data.tasks import make_splits, write_jsonl

pytestmark = pytest.mark.slow
ASSETS = Path(__file__).resolve().parents[2] / "tip_ray" / "embedded" / "assets"

# The worker nodes: logical CPUs and the custom resource each advertises. The head node gets one
# CPU and no custom resource, so no pool may be placed there.
NODES = {
    "rollout_node": {"num_cpus": 1, "resources": {"rollout_node": 1}},
    "teacher_node": {"num_cpus": 1, "resources": {"teacher_node": 1}},
    "learner_node": {"num_cpus": 2, "resources": {"learner_node": 2}},
}
# Which node each pool must land on, and how many actors it has.
POOLS = {"rollout": ("rollout_node", 1), "teacher": ("teacher_node", 1), "learner": ("learner_node", 2)}
ACTOR_CLASSES = {"rollout": "RolloutActor", "teacher": "TeacherActor", "learner": "LearnerActor"}


@pytest.fixture(scope="module")
def cluster():
    """A head plus one node per pool, shared by the module's tests; torn down (and the driver
    disconnected) even on failure."""
    import ray
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as env:
        # Raylets and their workers inherit this environment: one thread per process on a small,
        # shared machine; vLLM (if chosen) in-process.
        env.setenv("OMP_NUM_THREADS", "1")
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # The dashboard serves Ray's state API (where each actor runs); on a free port, since
        # other Ray instances may share the machine.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        sim = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": True, "dashboard_port": port})
        try:
            node_ids = {name: sim.add_node(**args).node_id for name, args in NODES.items()}
            sim.wait_for_nodes()
            yield sim, node_ids
        finally:
            ray.shutdown()
            sim.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode-data")
    train, _ = make_splits(0, 32, 8)
    write_jsonl(train, root / "train.jsonl")
    return root


def train_config(sim, data: Path, run_dir: Path, *overrides: str):
    """The embedded pair on the simulated cluster: every pool pinned to its node."""
    from tip_ray.cli import compose

    return compose("train", [
        f"student={ASSETS / 'student'}", f"teacher.model={ASSETS / 'teacher'}",
        f"data.path={data / 'train.jsonl'}", "eval_data=null",
        "rollout=hf", "rollout.max_new_tokens=48",
        "trainer.steps=2", "trainer.prompts_per_step=4", "trainer.eval_every=0",
        "learner.global_batch_size=4", "learner.micro_batch_size=2", "learner.world_size=2",
        f"trainer.output_dir={run_dir}", "logger=none",
        f"cluster.address={sim.address}", "cluster.num_cpus=null", "cluster.object_store_memory=null", "cluster.rollout.cpus=1", "cluster.teacher.cpus=1",
        *(f"+cluster.{pool}.resources.{node}=1" for pool, (node, _) in POOLS.items()),
        *overrides,
    ])


def _placement(ray_module) -> dict[str, set[str]]:
    """Pool name -> the node ids its placement group's bundles were put on."""
    where: dict[str, set[str]] = {}
    for table in ray_module.util.placement_group_table().values():
        if table["state"] != "CREATED" or not str(table["name"]).startswith("tip_ray."):
            continue
        pool = str(table["name"]).removeprefix("tip_ray.")
        where.setdefault(pool, set()).update(table["bundles_to_node_id"].values())
    return where


def _actor_nodes() -> dict[str, list[str]]:
    """Actor class name -> node ids of this job's live actors (Ray's state API)."""
    import ray
    from ray.util.state import list_actors

    job = ray.get_runtime_context().get_job_id()
    out: dict[str, list[str]] = {}
    alive = list_actors(filters=[("state", "=", "ALIVE"), ("job_id", "=", job)], limit=1000,
                        raise_on_missing_output=False)
    for actor in alive:
        out.setdefault(actor.class_name, []).append(actor.node_id)
    return out


def test_pools_pinned_to_their_nodes_train_two_steps(cluster, data, tmp_path):
    import ray

    from tip_ray.trainer import Trainer

    sim, node_ids = cluster
    cfg = train_config(sim, data, tmp_path / "run")
    assert cfg.cluster.learner.resources == {"learner_node": 1.0}

    started = time.monotonic()
    trainer = Trainer(cfg)
    try:
        # Placement groups: every bundle of a pool is on the node that advertises its resource.
        placed = _placement(ray)
        for pool, (node, _) in POOLS.items():
            assert placed.get(pool) == {node_ids[node]}, (pool, placed, node_ids)
        # Actors: each pool's actors run on that node, none on the head.
        actors = _actor_nodes()
        for pool, (node, count) in POOLS.items():
            assert actors.get(ACTOR_CLASSES[pool]) == [node_ids[node]] * count, (pool, actors, node_ids)
        summary = trainer.fit()
    finally:
        trainer.close()
    elapsed = time.monotonic() - started

    assert summary.steps == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["valid_tokens"] > 0 and r["kept_tokens"] == -(-r["valid_tokens"] // 2) for r in steps)
    assert steps[-1]["weight_version"] == 2
    assert elapsed < 240, f"two steps on the simulated cluster took {elapsed:.0f} s"


def test_a_pool_pinned_to_a_resource_no_node_has_fails_before_any_actor_starts(cluster, data, tmp_path):
    import ray

    from tip_ray.runtime.placement import ResourceError
    from tip_ray.trainer import Trainer

    sim, _ = cluster
    cfg = train_config(sim, data, tmp_path / "run", "+cluster.teacher.resources.gpu_node=1")
    try:
        with pytest.raises(ResourceError, match=r"short of 1 gpu_node .*teacher: 1 x"):
            Trainer(cfg)
        assert not _actor_nodes()
    finally:
        ray.shutdown()
