"""Per-sequence advantages from task rewards (the reward term next to distillation).

A sample's reward r_i is a float, NaN where its prompt has no answer (not graded). Its advantage:

- ``group``: r_i - mean of the graded rewards of its prompt's samples (GRPO's baseline);
- ``batch``: r_i - mean of every graded reward of the batch;
- ``none``: r_i.

With ``std_normalize`` the centred value is divided by the standard deviation of the same set
(Bessel-corrected, as verl's and TRL's GRPO) plus ``eps``; a set of one sample gets advantage 0
(its reward is its own mean). Ungraded samples get advantage 0 and enter no mean. The learner's
loss term is -A_i log p(y_t) at every response token of sequence i (``tip_ray.tip.lean``).
"""

from __future__ import annotations

import torch

BASELINES: tuple[str, ...] = ("group", "batch", "none")


def sequence_advantages(
    rewards: torch.Tensor,
    groups: torch.Tensor,
    baseline: str = "group",
    std_normalize: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Advantages float32 [N] (CPU) of the rewards [N] (float, NaN = ungraded) of N samples whose
    prompt is ``groups`` [N] (int ids; samples of one prompt share an id)."""
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if rewards.dim() != 1 or tuple(groups.shape) != tuple(rewards.shape):
        raise ValueError(f"rewards and groups must both be [N], got {tuple(rewards.shape)} and {tuple(groups.shape)}")
    if std_normalize and baseline == "none":
        raise ValueError("std_normalize needs a baseline (group or batch) to centre the rewards first")
    r = rewards.detach().double().cpu()
    graded = ~torch.isnan(r)
    out = torch.zeros_like(r)
    if baseline == "none":
        out[graded] = r[graded]
        return out.float()
    keys = groups.cpu() if baseline == "group" else torch.zeros_like(groups, device="cpu")
    for key in torch.unique(keys[graded]):
        members = graded & (keys == key)
        values = r[members]
        if values.numel() < 2:
            continue  # its own mean: advantage 0
        centred = values - values.mean()
        if std_normalize:
            centred = centred / (values.std() + eps)
        out[members] = centred
    return out.float()
