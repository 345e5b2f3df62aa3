"""The collective weight sync on a local Ray cluster: a 2-rank learner (ZeRO-2 and ZeRO-3) sends
its weights over gloo, in several buckets, to the vLLM workers of 2 rollout actors; a rollout
actor that dies breaks one sync, and the next forms a new group without it."""

from __future__ import annotations

import pytest
import torch
from tiny import reference_logprobs, save_tiny_pair

from tip_ray.config import LearnerConfig, LossConfig, RolloutConfig, SelectionConfig, SyncConfig, TeacherConfig

pytestmark = pytest.mark.slow

PROMPTS = [[3, 10, 20, 30, 40], [3, 11, 12]]


@pytest.fixture(scope="module")
def cluster():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("sync"))


@pytest.fixture(scope="module")
def rollout_actors(cluster, checkpoints):
    from tip_ray.runtime.actors import RolloutActor

    cfg = RolloutConfig(engine="vllm", n=2, max_new_tokens=8, max_model_len=64, dtype="float32", logprobs=True,
                        gpu_memory_utilization=0.05)
    actors = [cluster.remote(RolloutActor).options(num_cpus=1).remote(cfg, checkpoints["student"], i) for i in range(2)]
    cluster.get([a.weight_version.remote() for a in actors])
    return actors


def assert_actors_sample_from(ray, actors, model, version: int) -> None:
    for actor in actors:
        rollouts = ray.get(actor.generate.remote(PROMPTS))
        assert rollouts.policy_version == version
        for g, expected in zip(rollouts.generations, reference_logprobs(model, rollouts)):
            assert g.logprobs == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("zero_stage", [pytest.param(2, marks=pytest.mark.heavy), 3])  # 3: the gathered one
def test_collective_sync_serves_the_learners_weights(zero_stage, cluster, checkpoints, rollout_actors):
    from transformers import AutoModelForCausalLM

    from tip_ray.runtime.learner_group import LearnerGroup
    from tip_ray.runtime.placement import PoolResources
    from tip_ray.sync.transports import make_transport, sync_weights
    from tip_ray.teacher.worker import TeacherWorker
    from tip_ray.types import TrainBatch

    ray, actors = cluster, rollout_actors
    learner = LearnerGroup(PoolResources("learner", 2, cpus=1),
                           LearnerConfig(model=checkpoints["student"], world_size=2, zero_stage=zero_stage, lr=1e-2,
                                         global_batch_size=4, micro_batch_size=1),
                           SelectionConfig(rule="soft_or", ratio=0.5), LossConfig())
    cfg = SyncConfig(transport="collective", backend="gloo", bucket_mb=0.02, timeout_s=60)
    transport = make_transport(cfg, learner, actors[:1])  # formed with one actor; a sync to two re-forms it
    try:
        assert transport.backend == "gloo" and transport.world_size == 2 and len(transport.plan) >= 4

        # One learner step on the rollout actors' samples, scored by a real teacher.
        served = ray.get(actors[0].weight_version.remote())
        rollouts = ray.get(actors[0].generate.remote(PROMPTS))
        input_ids, attention, loss_mask = rollouts.to_sequences(pad_id=0)
        signal = TeacherWorker(TeacherConfig(model=checkpoints["teacher"], top_k=16)).score(input_ids, attention)
        batch = TrainBatch(input_ids, attention, loss_mask, signal, rollouts.policy_version)
        learner.train_step(batch)

        version = served + 1
        report = sync_weights(learner, actors, version, transport)
        assert report.version == version and report.transport == "collective"
        assert transport.world_size == 3 and transport.formations == 2
        assert report.bytes_per_actor == transport.bytes > 0
        assert ray.get([a.weight_version.remote() for a in actors]) == [version, version]

        # The engines now sample from the learner's weights: their log-probs are the learner's.
        reference = AutoModelForCausalLM.from_pretrained(checkpoints["student"])
        initial = {k: v.clone() for k, v in reference.state_dict().items()}
        reference.load_state_dict(ray.get(learner.export_weights_ref()))
        assert any(not torch.equal(initial[k], v) for k, v in reference.state_dict().items()), "no weight changed"
        assert_actors_sample_from(ray, actors, reference, version)

        # A version that is not newer is refused before anything moves...
        with pytest.raises(ValueError, match="not newer"):
            sync_weights(learner, actors, version, transport)
        # ... and by the actors themselves, which still drain the broadcast, so the group stays in step.
        learner_refs = learner.broadcast_weights_refs()
        for ref in [a.receive_weights.remote(version) for a in actors]:
            with pytest.raises(ray.exceptions.RayTaskError, match="not newer"):
                ray.get(ref)
        assert ray.get(learner_refs)[0] == transport.bytes
        assert sync_weights(learner, actors, version + 1, transport).version == version + 1
        assert_actors_sample_from(ray, actors, reference, version + 1)
    finally:
        transport.close()
        learner.close()


def test_a_rollout_actor_dying_breaks_the_sync_and_the_next_sync_forms_a_new_group(cluster, checkpoints,
                                                                                   rollout_actors):
    """Runs last: it kills one of the module's rollout actors."""
    from transformers import AutoModelForCausalLM

    from tip_ray.runtime.learner_group import LearnerGroup
    from tip_ray.runtime.placement import PoolResources
    from tip_ray.sync.transports import make_transport, sync_weights

    ray, actors = cluster, rollout_actors
    learner = LearnerGroup(PoolResources("learner", 1, cpus=1),
                           LearnerConfig(model=checkpoints["student"], world_size=1, global_batch_size=2,
                                         micro_batch_size=1),
                           SelectionConfig(rule="soft_or", ratio=0.5), LossConfig())
    transport = make_transport(SyncConfig(transport="collective", backend="gloo", bucket_mb=0.02, timeout_s=30),
                               learner, actors)
    try:
        version = 1 + max(ray.get([a.weight_version.remote() for a in actors]))
        ray.kill(actors[1], no_restart=True)
        with pytest.raises(ray.exceptions.RayActorError):
            sync_weights(learner, actors, version, transport)
        assert transport.learner is None and transport.actors == []  # every live member left the group

        report = sync_weights(learner, actors[:1], version, transport)  # a new group, without the dead actor
        assert report.version == version and transport.formations == 2 and transport.world_size == 2
        reference = AutoModelForCausalLM.from_pretrained(checkpoints["student"])
        reference.load_state_dict(ray.get(learner.export_weights_ref()))
        assert_actors_sample_from(ray, actors[:1], reference, version)
    finally:
        transport.close()
        learner.close()
