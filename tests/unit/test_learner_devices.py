"""Device discipline of the learner, checked on the CPU.

GPUs fail on a tensor left on the host (the engine does not move its inputs; NCCL refuses CPU
tensors). CI has no GPU, so: the batch's placement is tested on the meta device, statistics
refuse a mask on another device, every collective is found in one module (a source scan), and
that module runs on gloo at world sizes 1 and 2.
"""

from __future__ import annotations

import ast
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tip_ray.devices import tensors_of, to_device
from tip_ray.tip import TeacherSignal
from tip_ray.tip.stats import STAT_NAMES, TokenStats
from tip_ray.types import TrainBatch

LEARNER = Path(__file__).resolve().parents[2] / "tip_ray" / "learner"
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter",
               "all_to_all", "all_to_all_single", "barrier", "monitored_barrier", "send", "recv", "isend", "irecv",
               "batch_isend_irecv"}
DIST_MODULES = {"dist", "torch.distributed", "distributed", "deepspeed.comm", "comm"}


def small_batch() -> TrainBatch:
    ids = torch.randint(0, 50, (2, 6))
    loss_mask = torch.zeros(2, 5, dtype=torch.bool)
    loss_mask[:, 2:] = True
    teacher = TeacherSignal.from_logits(torch.randn(2, 5, 50), ids[:, 1:], k=4, values_dtype=torch.float16)
    return TrainBatch(ids, torch.ones_like(ids), loss_mask, teacher, policy_version=3)


def test_every_tensor_of_the_batch_lands_on_the_target_device_with_its_dtype():
    batch = small_batch()
    placed = to_device(batch, "meta")
    before, after = tensors_of(batch), tensors_of(placed)
    assert set(after) >= {"input_ids", "attention_mask", "loss_mask", "teacher.topk_ids", "teacher.topk_logprobs",
                          "teacher.sampled_logprobs"}
    assert set(after) == set(before)
    for path, tensor in after.items():
        assert tensor.device.type == "meta", path
        assert tensor.dtype == before[path].dtype, path  # ids stay integer, log-probs keep the wire dtype
    assert placed.policy_version == 3


def test_selection_weights_are_placed_in_float32_not_the_model_dtype():
    weights = torch.tensor([[0.0, 1 / 3, 0.7]], dtype=torch.float64)
    placed = to_device(weights, "meta", float_dtype=torch.float32)
    assert placed.device.type == "meta" and placed.dtype == torch.float32
    ids = to_device(torch.tensor([1, 2]), "meta", float_dtype=torch.float32)
    assert ids.dtype == torch.long, "float_dtype applies to floating tensors only"


def test_placement_returns_tensors_already_in_place_without_copying():
    batch = small_batch()
    placed = to_device(batch, "cpu")
    assert placed.input_ids.data_ptr() == batch.input_ids.data_ptr()


def test_statistics_refuse_values_on_another_device_than_the_mask():
    mask = torch.tensor([[True, False]])
    values = {n: torch.zeros(1, device="meta") for n in STAT_NAMES}
    with pytest.raises(ValueError, match="move the batch"):
        TokenStats.from_flat(values, torch.zeros(1, 2, dtype=torch.long), mask, vocab_size=5)


def _collective_calls_outside_helper() -> list[str]:
    found = []
    for path in sorted(LEARNER.glob("*.py")):
        if path.name == "collectives.py":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
                if ast.unparse(node.func.value) in DIST_MODULES:
                    found.append(f"{path.name}:{node.lineno} {ast.unparse(node.func)}")
            if isinstance(node, ast.ImportFrom) and node.module in {"torch.distributed", "deepspeed.comm"}:
                found += [f"{path.name}:{node.lineno} from {node.module} import {a.name}" for a in node.names
                          if a.name in COLLECTIVES]
    return found


def test_no_collective_in_the_learner_bypasses_the_helper():
    assert _collective_calls_outside_helper() == [], (
        "call tip_ray.learner.collectives instead: it places tensors on the process group's device")


def test_the_scan_sees_a_raw_collective(tmp_path, monkeypatch):
    (tmp_path / "rogue.py").write_text("import torch.distributed as dist\n\ndef f(t):\n    dist.all_reduce(t)\n")
    monkeypatch.setattr(sys.modules[__name__], "LEARNER", tmp_path)
    assert _collective_calls_outside_helper() == ["rogue.py:4 dist.all_reduce"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collectives_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from tip_ray.learner import collectives

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = torch.full((rank + 1, 3), float(rank), dtype=torch.float64)  # ranks hold different row counts
    before = rows.clone()
    gathered, offset = collectives.all_gather_rows(rows)
    summed = collectives.all_reduce(torch.tensor([1.0, float(rank)]), out_device="cpu")
    result = {
        "device": str(collectives.group_device()),
        "gathered": gathered,
        "offset": offset,
        "unchanged": torch.equal(rows, before),
        "summed": summed,
        "max": collectives.max_over_ranks(float(10 * rank)),
        "agree_all": collectives.all_ranks_agree(True),
        "agree_one_false": collectives.all_ranks_agree(rank != world - 1),
    }
    collectives.barrier()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2])
def test_collectives_on_gloo(world, tmp_path):
    mp.start_processes(_collectives_rank, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True,
                       start_method="spawn")
    expected = torch.cat([torch.full((r + 1, 3), float(r), dtype=torch.float64) for r in range(world)])
    for rank in range(world):
        seen = torch.load(tmp_path / f"rank{rank}.pt")
        assert seen["device"] == "cpu"
        torch.testing.assert_close(seen["gathered"], expected, rtol=0, atol=0)
        assert seen["offset"] == sum(r + 1 for r in range(rank))
        assert seen["unchanged"]
        torch.testing.assert_close(seen["summed"], torch.tensor([float(world), float(sum(range(world)))]))
        assert seen["max"] == 10.0 * (world - 1)
        assert seen["agree_all"] and not seen["agree_one_false"]
