"""Several teachers, each prompt routed to one of them (``RoutingConfig``), and the start-up
checks that tie the routes, the teachers and their placement together (``check_teachers``).

``teacher`` stays the run's default teacher, named ``default``; ``teachers`` adds named ones
(``teachers.strong.model=...``), each a whole ``TeacherConfig`` (model, backend, top-K, actors)
placed by ``cluster.teachers.<name>`` (else ``cluster.teacher``). A prompt's teacher is fixed
when the prompts are loaded (``tip_ray.data.routing``): by a data field (``routing.field``, the
way verl routes by ``data_source``) or by seeded weights per prompt.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypeVar

from tip_ray.config.fields import identity, raise_first_failure

if TYPE_CHECKING:
    from tip_ray.config.engines import TeacherConfig
    from tip_ray.config.run import PoolPlacement, TrainConfig

T = TypeVar("T")

DEFAULT_TEACHER = "default"  # the name of ``teacher``, the run's default teacher
ROUTING_UNMAPPED = ("error", "default")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass
class RoutingConfig:
    """Which teacher scores each prompt (off: every prompt goes to ``teacher``).

    ``field``: a data field (dotted path, like ``data.prompt_field``) whose value picks the
    teacher: through ``map`` (value -> teacher name) when it is given, else the value itself is
    the teacher's name (``default`` or a key of ``teachers``). ``unmapped``: what a row whose value
    has no teacher (or that lacks the field: evaluation data without it) does: ``error`` (the
    default: a ``DataError`` naming the row) or ``default`` (the default teacher). ``weights``
    (teacher name -> positive weight; instead of ``field``): each prompt draws its teacher with
    these odds from a hash of ``(seed, prompt uid)``, so the same prompt always goes to the same
    teacher (a resumed run, and evaluation, route it the same way). The training and evaluation
    prompts are routed by the same rule.
    """

    field: str | None = identity(None)
    map: dict[str, str] = identity(default_factory=dict)
    unmapped: str = identity("error")
    weights: dict[str, float] = identity(default_factory=dict)
    seed: int = identity(0)

    def __post_init__(self) -> None:
        checks = (
            (self.field != "", "routing.field must be a field name, a dotted path, or null; got an empty string"),
            (self.field is None or not self.weights,
             "routing.field and routing.weights are two ways to route: set one of them"),
            (not self.map or self.field is not None, "routing.map needs routing.field (the field whose values it maps)"),
            (self.unmapped in ROUTING_UNMAPPED,
             f"routing.unmapped must be one of {ROUTING_UNMAPPED}, got {self.unmapped!r}"),
            (all(w > 0 for w in self.weights.values()), f"routing.weights must all be > 0, got {dict(self.weights)}"),
            (self.seed >= 0, f"routing.seed must be >= 0, got {self.seed}"),
        )
        raise_first_failure(checks)

    @property
    def active(self) -> bool:
        """Whether prompts are routed (a field or weights is set)."""
        return self.field is not None or bool(self.weights)


def typed_entries(raw: Mapping[str, Any], base: T, key: str, own_key: str,
                  required: tuple[str, ...] = ()) -> dict[str, T]:
    """``raw`` (name -> a config like ``base`` or a mapping of some of its fields, as Hydra gives
    ``+key.name.field=...`` overrides) as ``{name: config}``, in order; a field a mapping leaves
    out takes ``base``'s value (an extra teacher is ``teacher`` with its own model, placed as
    ``cluster.teacher`` unless said otherwise). Errors name ``<key>.<name>.<field>``: an unknown
    field, a ``required`` one left out, and the config's own checks (their ``<own_key>.`` prefix
    becomes ``<key>.<name>.``). Typed dicts of dataclasses cannot take new entries from Hydra's
    command line, hence plain mappings converted here."""
    cls = type(base)
    out: dict[str, T] = {}
    for name, value in raw.items():
        if isinstance(value, cls):
            out[str(name)] = value
            continue
        if not isinstance(value, Mapping):
            raise ValueError(f"{key}.{name} must be a mapping of {cls.__name__} fields, got {value!r}")
        known = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"{key}.{name}: unknown keys {unknown}; the keys are {known}")
        missing = [f for f in required if value.get(f) is None]
        if missing:
            raise ValueError(f"{key}.{name}.{missing[0]} must be set (e.g. +{key}.{name}.{missing[0]}=...)")
        try:
            out[str(name)] = cls(**{**{f: getattr(base, f) for f in known}, **value})
        except ValueError as exc:
            raise ValueError(re.sub(rf"\b{re.escape(own_key)}\.", f"{key}.{name}.", str(exc))) from None
    return out


def teacher_configs(cfg: TrainConfig) -> dict[str, TeacherConfig]:
    """Every teacher of the run by name: ``default`` (``teacher``) first, then ``teachers`` in order."""
    return {DEFAULT_TEACHER: cfg.teacher, **cfg.teachers}


def teacher_placement(cfg: TrainConfig, name: str) -> PoolPlacement:
    """Where the pool of teacher ``name`` goes: ``cluster.teachers.<name>``, else ``cluster.teacher``."""
    return cfg.cluster.teachers.get(name, cfg.cluster.teacher) if name != DEFAULT_TEACHER else cfg.cluster.teacher


def routed_names(routing: RoutingConfig) -> set[str]:
    """The teacher names a routing config names itself (``map`` values, ``weights`` keys)."""
    return set(routing.map.values()) | set(routing.weights)


def check_teachers(cfg: TrainConfig) -> None:
    """The checks across ``teacher``, ``teachers``, ``routing`` and ``cluster.teachers`` (each
    ``ValueError`` names its keys): names are usable (``default`` is ``teacher``'s), every route
    names a configured teacher, extra teachers are routed to, placements name teachers, and the
    teachers send signals the learner can join: one values dtype, and top-Ks that are all
    numbers or all null (the whole vocabulary, compared once the vocabularies are read, in
    ``tip_ray.trainer``). Numbers may differ: a smaller top-K is padded by absent slots
    (``TeacherSignal.padded_to``) and each sequence reads its own teacher's K."""
    names = teacher_configs(cfg)
    routing = cfg.routing
    bad_names = [n for n in cfg.teachers if n == DEFAULT_TEACHER or not _NAME.match(n)]
    unknown_routes = sorted(routed_names(routing) - set(names))
    unknown_places = sorted(set(cfg.cluster.teachers) - set(cfg.teachers))
    k, dtype = cfg.teacher.top_k, cfg.teacher.values_dtype
    checks = (
        (not bad_names, f"teachers: the names {bad_names} are not usable: 'default' is teacher's own name, and a "
                        "name is letters, digits, '_', '-', '.'"),
        (not unknown_routes, f"routing names teachers {unknown_routes} that are not configured; the teachers are "
                             f"{list(names)} ('default' is teacher, the others are keys of teachers)"),
        (not cfg.teachers or routing.active,
         f"teachers {list(cfg.teachers)} are configured but no prompt is routed to them: set routing.field (a data "
         "field naming each prompt's teacher) or routing.weights"),
        (not unknown_places, f"cluster.teachers places {unknown_places}, which are not keys of teachers "
                             f"({list(cfg.teachers)})"),
        *(((t.top_k is None) == (k is None),
           f"teachers.{n}.top_k = {t.top_k} and teacher.top_k = {k}: a null top_k (the teacher's whole distribution, "
           "exact divergences) cannot be mixed with a top-K teacher in one signal; give every teacher a number, or "
           "every teacher null") for n, t in cfg.teachers.items()),
        *((t.values_dtype == dtype, f"teachers.{n}.values_dtype = {t.values_dtype} differs from teacher.values_dtype "
                                    f"= {dtype}; give every teacher the same values_dtype")
          for n, t in cfg.teachers.items()),
    )
    raise_first_failure(checks)
