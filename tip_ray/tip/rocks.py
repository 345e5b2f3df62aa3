"""Rock tokens for the ``rock_freeze`` rule (TIP_SPEC section 4, R7): build, save, load.

From the sampled tokens of many student rollouts and their per-token reverse KL to the teacher,
each token id v gets the score R(v) = frequency(v) * mean rkl(v) (frequency is the share of all
valid response tokens that are v; so R(v) is v's share of the total divergence). The most
frequent ids are dropped (formatting and filler the student must keep producing), and the
highest-R ids that remain are the rocks. The rule then weights them by lambda (0: frozen).

A rock set is a JSON file holding the ids in rank order, their statistics, the parameters and
the provenance (which student and teacher, how many rollouts and tokens). Pure torch + json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMAT = "tip_ray.rocks/1"
DEFAULT_NUM_ROCKS = 100
DEFAULT_DROP_MOST_FREQUENT = 5


class RockFileError(ValueError):
    """A rock file that is missing, not JSON, or not in the rock-set format."""


@dataclass(frozen=True)
class RockSet:
    """Rock token ids in rank order (highest R first) with their statistics.

    ``scores[i]`` = R, ``frequency[i]`` (share of valid tokens), ``mean_rkl[i]`` and ``count[i]``
    belong to ``token_ids[i]``. ``dropped_ids`` are the most frequent ids left out before ranking.
    ``params`` are the build parameters, ``provenance`` where the rollouts came from.
    """

    token_ids: tuple[int, ...]
    scores: tuple[float, ...]
    frequency: tuple[float, ...]
    mean_rkl: tuple[float, ...]
    count: tuple[int, ...]
    dropped_ids: tuple[int, ...]
    num_tokens: int
    params: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The file's JSON object."""
        return {
            "format": FORMAT,
            "rock_ids": list(self.token_ids),
            "scores": list(self.scores),
            "frequency": list(self.frequency),
            "mean_rkl": list(self.mean_rkl),
            "count": list(self.count),
            "dropped_ids": list(self.dropped_ids),
            "num_tokens": self.num_tokens,
            "params": dict(self.params),
            "provenance": dict(self.provenance),
        }


def token_divergence_table(
    token_ids: torch.Tensor, rkl: torch.Tensor, mask: torch.Tensor | None = None, vocab_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-id count [V] (int64) and summed rkl [V] (float64) over the valid tokens.

    ``token_ids`` and ``rkl`` have the same shape (any, e.g. [B, T] or flat [m]); ``mask`` (bool,
    same shape, default all True) marks the valid response positions. ``vocab_size`` defaults to
    max id + 1.
    """
    if token_ids.shape != rkl.shape:
        raise ValueError(f"token_ids {tuple(token_ids.shape)} and rkl {tuple(rkl.shape)} must have the same shape")
    if mask is None:
        mask = torch.ones(token_ids.shape, dtype=torch.bool, device=token_ids.device)
    if mask.shape != token_ids.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(token_ids.shape)}, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    ids = token_ids[mask].long().cpu()
    values = rkl[mask].double().cpu()
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"token_ids holds a negative id ({int(ids.min())}) at a valid position")
    if bool(torch.isnan(values).any()):
        raise ValueError("rkl holds NaN at a valid position")
    size = int(ids.max()) + 1 if ids.numel() else 0
    if vocab_size is not None:
        if size > vocab_size:
            raise ValueError(f"token id {size - 1} is outside the vocabulary of size {vocab_size}")
        size = vocab_size
    counts = torch.bincount(ids, minlength=size)
    sums = torch.zeros(size, dtype=torch.float64).index_add_(0, ids, values)
    return counts, sums


def rock_set_from_table(
    counts: torch.Tensor,
    rkl_sums: torch.Tensor,
    *,
    num_rocks: int = DEFAULT_NUM_ROCKS,
    drop_most_frequent: int = DEFAULT_DROP_MOST_FREQUENT,
    provenance: dict[str, Any] | None = None,
) -> RockSet:
    """The rock set from per-id counts [V] and summed rkl [V] (see ``token_divergence_table``).

    Ids never seen are not candidates. The ``drop_most_frequent`` most frequent ids are removed
    (ties: lower id first), then the ``num_rocks`` highest R = count/total * mean rkl are kept
    (ties: lower id first). Fewer than ``num_rocks`` come back when fewer candidates remain.
    """
    if num_rocks < 1:
        raise ValueError(f"num_rocks must be >= 1, got {num_rocks}")
    if drop_most_frequent < 0:
        raise ValueError(f"drop_most_frequent must be >= 0, got {drop_most_frequent}")
    if counts.dim() != 1 or counts.shape != rkl_sums.shape:
        raise ValueError(f"counts and rkl_sums must be 1-D of equal length, got {tuple(counts.shape)} and "
                         f"{tuple(rkl_sums.shape)}")
    counts = counts.long().cpu()
    sums = rkl_sums.double().cpu()
    total = int(counts.sum())
    if total == 0:
        raise ValueError("no valid tokens: a rock set needs at least one scored token")
    seen = torch.nonzero(counts > 0).squeeze(-1)  # ascending ids, so stable sorts break ties by id
    by_count = seen[torch.sort(counts[seen], descending=True, stable=True).indices]
    dropped = by_count[:drop_most_frequent]
    candidates = by_count[drop_most_frequent:].sort().values
    mean = sums[candidates] / counts[candidates]
    score = counts[candidates].double() / total * mean  # = sum of rkl(v) / total
    order = torch.sort(score, descending=True, stable=True).indices[:num_rocks]
    rocks = candidates[order]
    return RockSet(
        token_ids=tuple(int(v) for v in rocks),
        scores=tuple(float(s) for s in score[order]),
        frequency=tuple(float(counts[v]) / total for v in rocks),
        mean_rkl=tuple(float(m) for m in mean[order]),
        count=tuple(int(counts[v]) for v in rocks),
        dropped_ids=tuple(int(v) for v in dropped),
        num_tokens=total,
        params={"num_rocks": num_rocks, "drop_most_frequent": drop_most_frequent},
        provenance=dict(provenance or {}),
    )


def build_rock_set(
    token_ids: torch.Tensor,
    rkl: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    num_rocks: int = DEFAULT_NUM_ROCKS,
    drop_most_frequent: int = DEFAULT_DROP_MOST_FREQUENT,
    vocab_size: int | None = None,
    provenance: dict[str, Any] | None = None,
) -> RockSet:
    """The rock set of sampled ``token_ids`` with their ``rkl`` (same shape) at ``mask``.

    Shorthand for ``rock_set_from_table(*token_divergence_table(...), ...)``.
    """
    counts, sums = token_divergence_table(token_ids, rkl, mask, vocab_size)
    return rock_set_from_table(counts, sums, num_rocks=num_rocks, drop_most_frequent=drop_most_frequent,
                               provenance=provenance)


def save_rock_set(rocks: RockSet, path: str | Path) -> Path:
    """Write ``rocks`` as JSON to ``path`` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rocks.to_json(), indent=2) + "\n")
    return path


def load_rock_set(path: str | Path) -> RockSet:
    """Read a rock file written by ``save_rock_set``; ``RockFileError`` naming the file and the
    problem if it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise RockFileError(f"rock file {path} does not exist (build one with `tip-ray rocks --out {path}`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RockFileError(f"rock file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise RockFileError(f"rock file {path} is not a rock set (expected \"format\": \"{FORMAT}\")")
    columns = ("rock_ids", "scores", "frequency", "mean_rkl", "count")
    for key in (*columns, "dropped_ids", "num_tokens"):
        if key not in data:
            raise RockFileError(f"rock file {path} has no {key!r}")
    ids = data["rock_ids"]
    if not isinstance(ids, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ids):
        raise RockFileError(f"rock file {path}: 'rock_ids' must be a list of non-negative integers")
    if len(set(ids)) != len(ids):
        raise RockFileError(f"rock file {path}: 'rock_ids' repeats an id")
    for key in columns[1:]:
        if not isinstance(data[key], list) or len(data[key]) != len(ids):
            raise RockFileError(f"rock file {path}: {key!r} must be a list as long as 'rock_ids' ({len(ids)})")
    return RockSet(
        token_ids=tuple(ids),
        scores=tuple(float(v) for v in data["scores"]),
        frequency=tuple(float(v) for v in data["frequency"]),
        mean_rkl=tuple(float(v) for v in data["mean_rkl"]),
        count=tuple(int(v) for v in data["count"]),
        dropped_ids=tuple(int(v) for v in data["dropped_ids"]),
        num_tokens=int(data["num_tokens"]),
        params=dict(data.get("params", {})),
        provenance=dict(data.get("provenance", {})),
    )


def load_rock_ids(path: str | Path) -> list[int]:
    """The rock token ids of a rock file, in rank order."""
    return list(load_rock_set(path).token_ids)
