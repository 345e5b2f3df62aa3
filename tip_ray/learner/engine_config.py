"""The DeepSpeed configuration of a learner rank, from ``LearnerConfig``.

One place states what DeepSpeed is asked for, so that the worker and the tests that check
DeepSpeed's behaviour under it build the same engine.
"""

from __future__ import annotations

from typing import Any

from tip_ray.config import LearnerConfig


def deepspeed_config(learner: LearnerConfig) -> dict[str, Any]:
    """The ``config`` dict for ``deepspeed.initialize`` of one rank of ``learner``'s group.

    bf16 trains with float32 gradient accumulation (``data_types.grad_accum_dtype``): without it
    DeepSpeed accumulates the micro-batches' gradients in the model's dtype (its
    ``get_data_types``), and bf16 rounds away a micro-batch's contribution under about 2^-8 of
    the running sum: with a preset's 32 micro-batches a rank, late micro-batches lose most of
    theirs. With it ZeRO-2/3 keep their gradient partitions in float32 (2 more bytes a parameter
    over the world size). ``LearnerConfig`` refuses bf16 under ZeRO-0 (DeepSpeed's stage 0 has no
    float32 accumulation) and ZeRO-1 (its float32 accumulation is ``BF16_Optimizer``, which
    divides the gradient by the micro-batch count whatever ``engine.backward``'s
    ``scale_wrt_gas`` says; the learner's loss is already the global mean).
    """
    bf16 = learner.dtype == "bf16"
    return {
        "train_micro_batch_size_per_gpu": learner.micro_batch_size,
        "gradient_accumulation_steps": learner.grad_accumulation_steps,
        "gradient_clipping": learner.grad_clip,
        "zero_optimization": {"stage": learner.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        **({"data_types": {"grad_accum_dtype": "fp32"}} if bf16 else {}),
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
