"""One learner step (a real ``LearnerWorker`` rank on gloo, a tiny Qwen3, in a spawned process:
DeepSpeed keeps one engine per process) with the task-reward term: with a teacher equal to the
student the distillation gradient is zero, so the update is the reward term's alone, and it must
raise the log-probability of the positively-advantaged sequence's tokens and lower the other's."""

from __future__ import annotations

import math
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow  # builds a DeepSpeed engine


def _sequence_logprobs(model, batch) -> torch.Tensor:
    """Sum over each sequence's response tokens of log p(y_t) under ``model``: float64 [B]."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].double()
    logp = torch.log_softmax(logits, -1).gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (logp * batch.loss_mask).sum(-1)


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
    from tiny import save_tiny_model
    from transformers import AutoModelForCausalLM

    from tip_ray.config import LearnerConfig, LossConfig, RewardConfig, SelectionConfig
    from tip_ray.learner.worker import LearnerWorker
    from tip_ray.tip import TeacherSignal
    from tip_ray.types import TrainBatch

    path = save_tiny_model(Path(out_dir) / "student")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (2, 16), generator=g)
    loss_mask = torch.zeros(2, 15, dtype=torch.bool)
    loss_mask[:, 5:] = True
    attention = torch.ones_like(ids)
    with torch.no_grad():
        student_logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
    # The teacher is the student itself (full distribution): the reverse KL and its gradient are 0.
    teacher = TeacherSignal.from_logits(student_logits, ids[:, 1:], None)
    batch = TrainBatch(ids, attention, loss_mask, teacher, advantages=torch.tensor([1.0, -1.0]))
    before = _sequence_logprobs(model, batch)
    cfg = LearnerConfig(model=path, zero_stage=1, optimizer="sgd", lr=0.5, global_batch_size=2, micro_batch_size=1,
                        grad_clip=0.0, chunk_rows=7)
    loss = LossConfig(reward=RewardConfig(enabled=True, coef=2.0, baseline="batch"))
    worker = LearnerWorker(cfg, SelectionConfig(rule="soft_or", ratio=0.5), loss)
    try:
        try:
            worker.forward_backward(TrainBatch(ids, attention, loss_mask, teacher))
            refused = ""
        except ValueError as exc:
            refused = str(exc)
        metrics, report = worker.train_step(batch)
        model.load_state_dict(worker.export_weights())
    finally:
        worker.close()
    after = _sequence_logprobs(model, batch)
    torch.save({"refused": refused, "metrics": metrics, "report": report, "before": before, "after": after,
                "tokens": int(loss_mask.sum())}, os.path.join(out_dir, "result.pt"))


def test_the_reward_term_moves_the_student_towards_the_positive_sequence(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(port, str(tmp_path)), nprocs=1, join=True, start_method="spawn")
    out = torch.load(tmp_path / "result.pt", weights_only=False)
    metrics, before, after = out["metrics"], out["before"], out["after"]
    assert out["refused"] == "loss.reward.enabled=true but the batch carries no advantages"
    assert out["report"] is not None and metrics.kept_tokens > 0 and abs(metrics.loss) < 1e-5
    # The term before its coefficient: -sum_i A_i sum_t log p(y_t) / the batch's response tokens.
    assert math.isclose(metrics.reward_loss, float(-(before[0] - before[1]) / out["tokens"]), rel_tol=1e-4)
    assert after[0] > before[0] + 0.05 and after[1] < before[1] - 0.05, (before, after)
