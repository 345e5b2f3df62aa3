"""The learner on CUDA: DeepSpeed ZeRO-2 and ZeRO-3 at world size 1 over NCCL, bf16, gradient
checkpointing on, in-process (no Ray); and the lean loss at vocabulary 151,936 in bf16 against
the plain full-logits loss. Skipped without CUDA (see conftest.py)."""

from __future__ import annotations

import math
import socket

import pytest
import torch
from tiny_qwen3 import QWEN3_VOCAB

from tip_ray.config import LearnerConfig, LossConfig, SelectionConfig
from tip_ray.tip import TeacherSignal
from tip_ray.types import TrainBatch

BATCH = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_batch(length: int = 96, k: int = 32, seed: int = 0) -> TrainBatch:
    """A right-padded batch on the host, as it arrives from the object store (the learner moves it)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (BATCH, length), generator=g)
    attention = torch.ones_like(ids)
    loss_mask = torch.zeros(BATCH, length - 1, dtype=torch.bool)
    for row in range(BATCH):
        end = length - 7 * row
        attention[row, end:] = 0
        ids[row, end:] = 0
        loss_mask[row, 10 : end - 1] = True
    logits = torch.randn(BATCH, length - 1, QWEN3_VOCAB, generator=g) * 2
    teacher = TeacherSignal.from_logits(logits, ids[:, 1:], k=k, values_dtype=torch.float16)
    return TrainBatch(ids, attention, loss_mask, teacher)


@pytest.fixture
def nccl_env(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")


@pytest.mark.parametrize("stage", [2, 3])
def test_learner_trains_on_cuda_with_nccl(stage, qwen3_student, nccl_env):
    import torch.distributed as dist

    from tip_ray.learner.worker import LearnerWorker

    cfg = LearnerConfig(model=qwen3_student, zero_stage=stage, dtype="bf16", lr=1e-3, global_batch_size=BATCH,
                        micro_batch_size=2, chunk_rows=64, gradient_checkpointing=True)
    worker = LearnerWorker(cfg, SelectionConfig(rule="soft_or", ratio=0.5), LossConfig())
    try:
        assert dist.get_backend() == "nccl" and worker.device.type == "cuda"
        before = worker.export_weights()
        losses = []
        for step in range(3):
            metrics, report = worker.train_step(host_batch(seed=step))
            assert not metrics.skipped and report is not None
            assert math.isfinite(metrics.loss) and math.isfinite(report["grad_norm"]), (metrics, report)
            assert metrics.peak_memory_bytes > 0
            losses.append(metrics.loss)
        after = worker.export_weights()
        assert set(after) == set(before)
        shapes = {n: tuple(p.shape) for n, p in worker.engine.module.lm.named_parameters()} if stage != 3 else {
            n: tuple(p.ds_shape) for n, p in worker.engine.module.lm.named_parameters()}
        for name, value in after.items():
            assert value.device.type == "cpu" and value.dtype == torch.bfloat16, name
            if name in shapes:
                assert tuple(value.shape) == shapes[name], f"{name}: exported {tuple(value.shape)}, full {shapes[name]}"
        assert after["lm_head.weight"].shape == (QWEN3_VOCAB, 256)
        assert any(not torch.equal(after[n], before[n]) for n in before), "no weight changed in 3 steps"
        assert worker.weights_finite()
    finally:
        worker.close()


@pytest.mark.parametrize("kind", ["rkl", "fkl"])
def test_lean_loss_matches_the_full_logits_loss_at_qwen3_vocabulary(kind):
    from tip_ray.tip.lean import kept_token_loss
    from tip_ray.tip.losses import distill_loss_from_logits

    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    rows, hidden_size = 2 * 384, 256
    hidden = torch.randn(2, rows // 2, hidden_size, device=device, generator=g).bfloat16()
    weight = (torch.randn(QWEN3_VOCAB, hidden_size, device=device, generator=g) * 0.05).bfloat16()
    ids = torch.randint(0, QWEN3_VOCAB, (2, rows // 2), device=device, generator=g)
    teacher = TeacherSignal.from_logits(torch.randn(2, rows // 2, QWEN3_VOCAB, device=device, generator=g) * 3, ids,
                                        k=64)
    mask = torch.rand(2, rows // 2, device=device, generator=g) < 0.9
    weights = torch.where(mask, torch.rand(2, rows // 2, device=device, generator=g) + 0.1, 0.0)

    def run(lean: bool):
        h = hidden.detach().clone().requires_grad_(True)
        w = weight.detach().clone().requires_grad_(True)
        if lean:
            loss = kept_token_loss(h, w, teacher, ids, weights, mask, kind=kind, chunk_rows=128)
        else:
            loss = distill_loss_from_logits(h @ w.T, ids, teacher, mask, weights=weights, kind=kind)
        loss.backward()
        return loss.detach().double(), h.grad.double(), w.grad.double()

    lean_loss, lean_h, lean_w = run(True)
    plain_loss, plain_h, plain_w = run(False)
    assert torch.isfinite(lean_loss)
    assert abs(float(lean_loss - plain_loss)) <= 1e-3 * abs(float(plain_loss)) + 1e-6

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    assert rel(lean_h, plain_h) < 2e-2
    assert rel(lean_w, plain_w) < 2e-2
