"""A bf16 learner accumulates its micro-batches' gradients in float32, under every ZeRO stage
that trains in bf16 (2, 3; ``LearnerConfig`` refuses 0 and 1), with the DeepSpeed config the
learner builds (``deepspeed_config``), and the step's gradient is their plain sum (the learner's
``engine.backward(..., scale_wrt_gas=False)``).

One weight vector w (bf16 on the model side), 16 micro-batches a step: the first has gradient 1
on every entry, the other 15 have 2^-10 each. Summed in float32 that is 1 + 15 * 2^-10; summed in
bf16 every 2^-10 is rounded away (half an ulp of 1 is 2^-8) and the sum stays 1. One SGD step at
lr 1 from w = 1 gives w = -15/1024 (exact in bf16) with float32 accumulation, and 0 without.
Each stage runs in a spawned process of its own (one gloo rank).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from tip_ray.config import LearnerConfig

pytestmark = pytest.mark.slow

MICRO_BATCHES = 16
SMALL = 2.0**-10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Scaled(torch.nn.Module):
    """sum(w * x): the gradient of w is x."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.w * x).sum()


def _one_step(_rank: int, port: int, stage: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    from tip_ray.learner.engine_config import deepspeed_config

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = LearnerConfig(model="unused", zero_stage=stage, dtype="bf16", optimizer="sgd", lr=1.0, grad_clip=0.0,
                        global_batch_size=MICRO_BATCHES, micro_batch_size=1)
    model = _Scaled()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg))
    for i in range(MICRO_BATCHES):
        x = torch.full((8,), 1.0 if i == 0 else SMALL, dtype=torch.bfloat16, device=engine.device)
        engine.backward(engine(x), scale_wrt_gas=False)  # as the learner does: no 1/16 scaling
        engine.step()  # DeepSpeed steps at the 16th, the accumulation boundary
    with deepspeed.zero.GatheredParameters([engine.module.w]):
        weights = engine.module.w.detach().float().cpu().clone()
    torch.save({"weights": weights, "grad_accum_dtype": engine.get_data_types()[1]}, out)


@pytest.mark.timeout(300)  # a hang in gloo or DeepSpeed's start-up fails the test, not the suite
@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_micro_batch_gradients_accumulate_in_float32(stage, tmp_path):
    out = tmp_path / f"zero{stage}.pt"
    mp.start_processes(_one_step, args=(_free_port(), stage, str(out)), nprocs=1, join=True, start_method="spawn")
    result = torch.load(out)
    assert result["grad_accum_dtype"] == torch.float32
    expected = 1.0 - (1.0 + (MICRO_BATCHES - 1) * SMALL)  # -15/1024; bf16 accumulation would leave 0.0
    assert torch.equal(result["weights"], torch.full((8,), expected)), result["weights"]
