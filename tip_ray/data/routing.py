"""Each prompt's teacher, fixed when the prompts are loaded (``routing`` keys: ``RoutingConfig``).

``Router(routing, teachers)`` is called once per source row by ``load_prompt_dataset``: by a data
field (its value through ``routing.map``, or the value itself as the teacher's name) or by
seeded weights over the prompt's uid (the same prompt goes to the same teacher in every epoch,
in a resumed run and in evaluation). A row whose value names no teacher, or that lacks the
field, raises ``DataError`` naming the row, or goes to the default teacher
(``routing.unmapped=default``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from tip_ray.config.routing import DEFAULT_TEACHER, RoutingConfig
from tip_ray.data.sources import DataError, get_field

_MISSING = object()


def weighted_choice(weights: dict[str, float], seed: int, uid: str) -> str:
    """The name drawn for prompt ``uid`` with odds ``weights`` (name -> weight > 0): a uniform
    number from a hash of ``(seed, uid)`` against the weights' cumulative shares in name order,
    so the draw depends on nothing else (not the row order, not the run)."""
    digest = hashlib.blake2b(f"{seed}/{uid}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2**64
    names = sorted(weights)
    total = sum(weights[n] for n in names)
    acc = 0.0
    for name in names:
        acc += weights[name] / total
        if u < acc:
            return name
    return names[-1]


class Router:
    """Routes rows to the teachers ``teachers`` (names; ``default`` among them) by ``routing``."""

    def __init__(self, routing: RoutingConfig, teachers: Sequence[str]) -> None:
        self.routing, self.teachers = routing, tuple(teachers)

    def __call__(self, row: dict[str, Any], index: int, uid: str, source: str) -> str:
        """The teacher of row ``index`` (uid ``uid``) of ``source``; ``DataError`` for a row that
        names no configured teacher (with ``routing.unmapped=error``)."""
        r = self.routing
        if not r.active:
            return DEFAULT_TEACHER
        if r.weights:
            return weighted_choice(r.weights, r.seed, uid)
        try:
            value: Any = get_field(row, r.field)
        except KeyError:
            value = _MISSING
        key = None if value is _MISSING or value is None else str(value)
        name = (r.map.get(key) if r.map else key) if key is not None else None
        if name in self.teachers:
            return name
        if r.unmapped == "default":
            return DEFAULT_TEACHER
        what = (f"has no routing.field={r.field!r}; fields in the row: {sorted(row)}" if value is _MISSING else
                f"has routing.field {r.field!r} = {value!r}, which "
                + (f"routing.map does not map (it maps {sorted(r.map)})" if r.map and name is None else
                   f"names no configured teacher (the teachers: {list(self.teachers)})"))
        raise DataError(f"{source}: row {index} {what}; set routing.unmapped=default to send such rows to the "
                        "default teacher")
