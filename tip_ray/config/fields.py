"""Field metadata of the config schemas: which fields make a run's identity (``identity``), and
the validation helper the schemas share."""

from __future__ import annotations

from dataclasses import MISSING, Field, field
from typing import Any

_RESUME = "resume"  # the field-metadata key, and its value on an identity field
_IDENTITY = "identity"


def identity(default: Any = MISSING, *, default_factory: Any = MISSING) -> Any:
    """A config field that is part of a training run's identity: a run resumed from its checkpoint
    must have the value the checkpoint was written with (``tip_ray.state.resume.IDENTITY_KEYS``).

    Used like ``field``: ``lr: float = identity(1e-6)``; without arguments for a mandatory field.
    On a field that holds a config dataclass it admits that class's identity fields, under the
    field's name (``learner`` -> ``learner.lr``, ...); a class's marks count only where every
    enclosing field is marked too (``data.seed`` is identity, ``eval_data.seed`` is not).
    """
    return field(default=default, default_factory=default_factory, metadata={_RESUME: _IDENTITY})


def is_identity(f: Field) -> bool:
    """Whether the dataclass field ``f`` was declared with ``identity``."""
    return f.metadata.get(_RESUME) == _IDENTITY


def raise_first_failure(checks: tuple[tuple[bool, str], ...]) -> None:
    """Raise ValueError with the message of the first (condition, message) whose condition is False."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
