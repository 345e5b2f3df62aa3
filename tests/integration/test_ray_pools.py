"""The three pools on a local Ray cluster: one real step and a weight sync, end to end."""

from __future__ import annotations

import pytest
import torch
from tiny import save_tiny_pair

from tip_ray.config import LearnerConfig, LossConfig, RolloutConfig, SelectionConfig, TeacherConfig
from tip_ray.tip import budget_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    import ray

    ray.init(num_cpus=5, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("pools"))


def test_resources_that_do_not_fit_fail_before_any_actor_starts(cluster):
    from tip_ray.runtime.placement import PoolResources, ResourceError, check_fits

    with pytest.raises(ResourceError, match="learner: 64 x"):
        check_fits([PoolResources("learner", 64, cpus=1)], cluster.cluster_resources())


# test_train (the pools through `tip-ray train`) and test_rollout_and_teacher (log-probs after a sync)
# cover it in `make test`.
@pytest.mark.heavy
def test_one_step_and_a_sync_reach_the_rollout_engine(cluster, checkpoints):
    from transformers import AutoModelForCausalLM

    from tip_ray.runtime.actors import RolloutActor, TeacherActor
    from tip_ray.runtime.learner_group import LearnerGroup
    from tip_ray.runtime.placement import PoolResources, on_bundle, reserve
    from tip_ray.sync.transports import sync_weights
    from tip_ray.types import TrainBatch

    ray = cluster
    rollout_pool = PoolResources("rollout", 1, cpus=1)
    group = reserve(rollout_pool)
    rollout = ray.remote(RolloutActor).options(num_cpus=1, scheduling_strategy=on_bundle(group, 0)).remote(
        RolloutConfig(engine="vllm", n=2, max_new_tokens=8, max_model_len=64, dtype="float32", logprobs=True),
        checkpoints["student"], 0)
    teacher = ray.remote(TeacherActor).options(num_cpus=1).remote(TeacherConfig(model=checkpoints["teacher"], top_k=16))
    learner = LearnerGroup(PoolResources("learner", 2, cpus=1),
                           LearnerConfig(model=checkpoints["student"], world_size=2, zero_stage=3, lr=1e-2,
                                         global_batch_size=4, micro_batch_size=1),
                           SelectionConfig(rule="soft_or", ratio=0.5), LossConfig())

    prompts = [[3, 10, 20, 30, 40], [3, 11, 12]]
    rollouts = ray.get(rollout.generate.remote(prompts))
    assert rollouts.policy_version == 0 and len(rollouts.generations) == 4
    input_ids, attention, loss_mask = rollouts.to_sequences(pad_id=0)
    signal = ray.get(teacher.score.remote(input_ids, attention))
    batch = TrainBatch(input_ids, attention, loss_mask, signal, rollouts.policy_version)
    metrics, step = learner.train_step(batch)  # the group gives each rank its half
    assert metrics[0].kept_tokens == budget_for(0.5, int(loss_mask.sum())) == metrics[1].kept_tokens
    assert step["lr"] > 0

    report = sync_weights(learner, [rollout], version=1)
    assert report.version == 1 and report.bytes_per_actor > 0
    assert ray.get(rollout.weight_version.remote()) == 1

    # The rollout engine now samples from the learner's weights: its log-probs are theirs.
    exported = ray.get(learner.export_weights_ref())
    reference = AutoModelForCausalLM.from_pretrained(checkpoints["student"])
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    reference.load_state_dict(exported)
    assert any(not torch.equal(before[k], exported[k]) for k in exported), "the step changed no weight"
    after = ray.get(rollout.generate.remote(prompts))
    assert after.policy_version == 1
    for g in after.generations:
        prompt = prompts[g.prompt_index]
        with torch.no_grad():
            logp = torch.log_softmax(reference(torch.tensor([prompt + g.token_ids])).logits[0].float(), -1)
        expected = [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(g.token_ids)]
        assert g.logprobs == pytest.approx(expected, abs=1e-4)
