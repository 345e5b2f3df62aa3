"""Which GPU an actor computes on (as Ray 2.60 sets CUDA_VISIBLE_DEVICES), and the GPU layouts
refused at start-up because NCCL cannot run them."""

from __future__ import annotations

import os

import pytest
import torch

from tip_ray import devices
from tip_ray.cli import compose
from tip_ray.devices import (
    assigned_visible,
    compute_device,
    hide_unassigned_gpus,
    local_gpu_index,
    show_only_assigned_gpus,
    to_device,
    visible_index,
)
from tip_ray.runtime.placement import ResourceError, check_distinct_gpus

# ---------------------------------------------------------------------------------------------
# The device an actor uses.


def test_ray_setting_cuda_visible_devices_to_the_assigned_gpu_makes_it_device_0():
    # Ray's default: CUDA_VISIBLE_DEVICES is the actor's assigned ids (node-level ids).
    assert visible_index([3], "3") == 0
    assert visible_index(["6", "2"], "6,2") == 0  # two GPUs: the first visible one


def test_without_ray_setting_it_the_assigned_gpu_is_found_among_the_visible_ones():
    # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1: the node's GPUs stay visible.
    assert visible_index([5], None) == 5
    # ... or the raylet's own CUDA_VISIBLE_DEVICES, in which Ray's ids are entries.
    assert visible_index(["6"], "4,5,6,7") == 2
    assert visible_index(["7", "5"], "4,5,6,7") == 1
    # Ray splits the raylet's list on commas without stripping: "4, 6" gives it the id " 6".
    assert visible_index([" 6"], "4, 6") == 1 and assigned_visible([" 6"], "4, 6") == "6"


def test_an_unassigned_or_invisible_gpu_is_an_error():
    with pytest.raises(ValueError, match="no GPU is assigned"):
        visible_index([], "0,1")
    with pytest.raises(ValueError, match="not all visible"):
        visible_index(["3"], "0,1")


def test_the_assigned_gpus_alone_are_shown_in_their_visible_order():
    assert assigned_visible([5], None) == "5"  # every GPU of the node visible
    assert assigned_visible(["3", "1"], None) == "1,3"
    assert assigned_visible(["6", "4"], "4,5,6,7") == "4,6"  # the raylet's own list: its entries
    assert assigned_visible(["GPU-b"], "GPU-a,GPU-b") == "GPU-b"
    with pytest.raises(ValueError, match="not all visible"):
        assigned_visible(["3"], "0,1")
    with pytest.raises(ValueError, match="no GPU is assigned"):
        assigned_visible([], "0,1")


@pytest.mark.parametrize(("noset", "assigned", "visible", "shown"), [
    ("1", ["2", "3"], None, "2,3"),  # every GPU visible: vLLM would open GPU 0 on every actor
    ("true", ["6"], "4,5,6,7", "6"),
    (None, ["0"], "0", "0"),  # Ray set it to the assigned GPU itself: left as it is
    ("0", ["2"], "0,1,2,3", "0,1,2,3"),  # Ray reads "0" as off, and so do we
    ("1", [], "0,1", ""),  # an actor given no GPU sees none, whatever the mode
])
def test_a_rollout_or_teacher_actor_sees_only_its_own_gpus(monkeypatch, noset, assigned, visible, shown):
    monkeypatch.setattr(devices, "_ray_gpu_ids", lambda: assigned)
    for name, value in ((devices.NOSET_ENV, noset), ("CUDA_VISIBLE_DEVICES", visible)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    show_only_assigned_gpus()
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == shown


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU behaviour")
def test_on_cpu_everything_stays_on_the_cpu():
    assert compute_device() == torch.device("cpu") and local_gpu_index() == 0
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    hide_unassigned_gpus()  # outside Ray: nothing to do
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before
    ids, mask = torch.tensor([[1, 2]]), torch.tensor([[1, 0]])
    moved = to_device((ids, mask), torch.device("cpu"))
    assert all(a is b for a, b in zip(moved, (ids, mask)))


@pytest.mark.slow
def test_a_ray_worker_given_no_gpu_sees_none():
    import ray

    def _actor_view() -> tuple[str | None, str | None, int]:  # local: Ray ships it by value
        before = os.environ.get("CUDA_VISIBLE_DEVICES")
        hide_unassigned_gpus()
        return before, os.environ.get("CUDA_VISIBLE_DEVICES"), local_gpu_index()

    ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        # Ray 2.60 leaves an actor with num_gpus=0 the CUDA_VISIBLE_DEVICES it inherits.
        probe = ray.remote(num_cpus=1, num_gpus=0)(_actor_view).options(
            runtime_env={"env_vars": {"CUDA_VISIBLE_DEVICES": "0,1"}})
        before, after, index = ray.get(probe.remote())
    finally:
        ray.shutdown()
    assert (before, after, index) == ("0,1", "", 0)


def test_two_learner_ranks_on_one_gpu_are_refused():
    check_distinct_gpus([("10.0.0.1", ["0"]), ("10.0.0.1", ["1"]), ("10.0.0.2", ["0"]), ("10.0.0.2", [])])
    with pytest.raises(ResourceError, match="learner ranks 0 and 2 share GPU 3 of node 10.0.0.1.*cluster.learner.gpus"):
        check_distinct_gpus([("10.0.0.1", ["3"]), ("10.0.0.1", ["4"]), ("10.0.0.1", ["3"])])


# ---------------------------------------------------------------------------------------------
# Layouts refused when the config is built.

ONE_RANK = ["learner.world_size=1"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["cluster.learner.gpus=0.5"], r"cluster.learner.gpus = 0.5 .* its 2 ranks' NCCL group"),
    (["cluster.learner.gpus=2"], r"cluster.learner.gpus must be at most 1"),
    ([*ONE_RANK, "cluster.learner.gpus=0.5", "cluster.rollout.gpus=1", "sync.transport=collective"],
     r"cluster.learner.gpus = 0.5 .* the NCCL weight sync"),
    (["sync.transport=collective", "sync.backend=nccl"], r"sync.backend=nccl needs the learner on GPUs"),
    (["cluster.learner.gpus=1", "cluster.rollout.gpus=0.5", "sync.transport=collective"],
     r"cluster.rollout.gpus = 0.5: the NCCL weight sync"),
    (["cluster.learner.gpus=1", "sync.transport=collective"], r"cluster.rollout.gpus = 0.0: the NCCL weight sync"),
    (["cluster=1node_8gpu", "rollout=hf", "learner.micro_batch_size=1"],
     r"sync.transport=collective needs rollout.engine=vllm"),
    # A vLLM engine runs a worker on a GPU of its own per tensor-parallel rank.
    (["rollout.tensor_parallel_size=2", "cluster.rollout.gpus=1"],
     r"cluster.rollout.gpus = 1.0 but rollout.tensor_parallel_size = 2: .* set cluster.rollout.gpus to 2"),
    (["teacher.backend=vllm", "teacher.tensor_parallel_size=2", "cluster.teacher.gpus=4"],
     r"cluster.teacher.gpus = 4.0 but teacher.tensor_parallel_size = 2"),
    (["cluster.rollout.gpus=2"], r"cluster.rollout.gpus = 2.0 but rollout.tensor_parallel_size = 1"),
    # A named teacher without a cluster entry of its own takes cluster.teacher's: the fix is its own entry.
    (["+teachers.weak.model=x", "+teachers.weak.backend=vllm", "+teachers.weak.tensor_parallel_size=2",
      "cluster.teacher.gpus=1", "routing.field=family"],
     r"cluster.teacher.gpus = 1.0 but teachers.weak.tensor_parallel_size = 2: .* give it cluster.teachers.weak "
     r"with gpus 2 \(it takes cluster.teacher's placement now\)"),
])
def test_layouts_nccl_cannot_run_are_refused_naming_the_key(overrides, message):
    with pytest.raises(SystemExit, match=message):
        compose("train", overrides)


@pytest.mark.parametrize("overrides", [
    [*ONE_RANK, "cluster.learner.gpus=0.5"],  # one rank, weights through the object store
    ["cluster.learner.gpus=1", "cluster.rollout.gpus=0.5", "sync.transport=collective", "sync.backend=gloo"],
    ["cluster.learner.gpus=1", "rollout.tensor_parallel_size=2", "cluster.rollout.gpus=2", "sync.transport=collective"],
    ["cluster.rollout.gpus=0.25", "cluster.teacher.gpus=0.25"],  # engines may share GPUs without NCCL
    ["rollout.tensor_parallel_size=2", "cluster.rollout.gpus=2"],
    ["rollout.tensor_parallel_size=2"],  # on the CPU: no GPU to count
])
def test_layouts_that_can_run_are_accepted(overrides):
    compose("train", overrides)
