"""Several teachers routed by prompt: the config keys and their start-up checks, routing rows to
teachers (a data field, a map, seeded weights), joining the teachers' signals in batch order,
the per-teacher metrics' names, and the teacher pools' placement."""

from __future__ import annotations

import json

import pytest
import torch
from driver_fakes import ASSETS, FakeTeacher

from tip_ray.config import DataConfig, RoutingConfig
from tip_ray.data.prompts import DataError, load_prompt_dataset
from tip_ray.data.routing import Router, weighted_choice
from tip_ray.driver.routing import (
    RoutedTeachers,
    join_by_rows,
    route_rows,
    routed,
    score_routed,
    teacher_metrics,
)
from tip_ray.eval.held_out import HeldOutEval
from tip_ray.tip.signal import TeacherSignal
from tip_ray.types import Generation, SamplingSettings

STUDENT, TEACHER = str(ASSETS / "student"), str(ASSETS / "teacher")


def compose(*overrides: str):
    from tip_ray.cli import compose as hydra_compose

    return hydra_compose("train", [f"student={STUDENT}", f"teacher.model={TEACHER}", *overrides])


def test_extra_teachers_take_the_default_teachers_keys_they_do_not_set():
    cfg = compose(f"+teachers.weak.model={STUDENT}", "+teachers.weak.num_workers=2", "routing.field=family",
                  "+routing.map.add=default", "+routing.map.mul=weak", "+cluster.teachers.weak.cpus=2")
    weak = cfg.teachers["weak"]
    assert (weak.model, weak.num_workers, weak.top_k, weak.backend) == (STUDENT, 2, cfg.teacher.top_k,
                                                                        cfg.teacher.backend)
    assert cfg.cluster.teachers["weak"].cpus == 2 and cfg.routing.map == {"add": "default", "mul": "weak"}
    assert compose().teachers == {} and not compose().routing.active  # off by default


@pytest.mark.parametrize("overrides, message", [
    ((f"+teachers.weak.model={STUDENT}",), "no prompt is routed to them"),
    (("routing.field=family", "+routing.map.mul=strong"), "routing names teachers ['strong']"),
    (("+routing.weights.strong=1",), "routing names teachers ['strong']"),
    ((f"+teachers.weak.model={STUDENT}", "+teachers.weak.top_k=4", "routing.field=f"),
     "teachers.weak.top_k = 4 and teacher.top_k = None: a null top_k"),
    ((f"+teachers.weak.model={STUDENT}", "+teachers.weak.values_dtype=bf16", "routing.field=f"),
     "teachers.weak.values_dtype"),
    (("+teachers.weak.num_workers=2", "routing.field=f"), "teachers.weak.model must be set"),
    ((f"+teachers.weak.model={STUDENT}", "+teachers.weak.topk=3", "routing.field=f"), "unknown keys ['topk']"),
    ((f"+teachers.weak.model={STUDENT}", "+teachers.weak.num_workers=0", "routing.field=f"),
     "teachers.weak.micro_batch_size and teachers.weak.num_workers"),
    ((f"+teachers.default.model={STUDENT}", "routing.field=f"), "'default' is teacher's own name"),
    ((f"+teachers.weak.model={STUDENT}", "routing.field=f", "+cluster.teachers.wek.cpus=1"),
     "cluster.teachers places ['wek']"),
    ((f"+teachers.weak.model={STUDENT}", "routing.field=f", "+cluster.teachers.weak.cpus=-1"),
     "cluster.teachers.weak.cpus must be >= 0"),
    (("routing.field=f", "+routing.weights.default=1"), "set one of them"),
    (("+routing.weights.default=0",), "routing.weights must all be > 0"),
    (("routing.unmapped=drop", "routing.field=f"), "routing.unmapped must be one of"),
])
def test_bad_teacher_and_routing_keys_are_refused_naming_the_key(overrides, message):
    with pytest.raises(SystemExit, match=None) as err:
        compose(*overrides)
    assert message in str(err.value)


def test_routing_keys_and_teachers_are_part_of_the_runs_identity():
    from tip_ray.state.resume import IDENTITY_KEYS

    assert {"teachers", "routing.field", "routing.map", "routing.weights", "routing.seed"} <= set(IDENTITY_KEYS)


ROWS = [{"prompt": "1+2=", "answer": "3", "family": "add", "id": "a"},
        {"prompt": "3*4=", "answer": "12", "family": "mul", "id": "b"},
        {"prompt": "5*6=", "answer": "30", "meta": {"family": "mul"}, "id": "c"}]


def test_a_field_routes_through_the_map_or_names_the_teacher_itself():
    names = ("default", "weak")
    mapped = Router(RoutingConfig(field="family", map={"add": "default", "mul": "weak"}), names)
    assert [mapped(r, i, r["id"], "src") for i, r in enumerate(ROWS[:2])] == ["default", "weak"]
    direct = Router(RoutingConfig(field="team"), names)
    assert direct({"team": "weak"}, 0, "0", "src") == "weak"
    nested = Router(RoutingConfig(field="meta.family", map={"mul": "weak"}), names)
    assert nested(ROWS[2], 2, "c", "src") == "weak"


def test_a_row_without_a_teacher_is_an_error_naming_the_row_unless_unmapped_is_default():
    names = ("default", "weak")
    strict = Router(RoutingConfig(field="family", map={"add": "weak"}), names)
    with pytest.raises(DataError, match=r"src: row 1 has routing.field 'family' = 'mul', which routing.map does not"):
        strict(ROWS[1], 1, "b", "src")
    with pytest.raises(DataError, match=r"src: row 2 has no routing.field='family'"):
        strict(ROWS[2], 2, "c", "src")
    with pytest.raises(DataError, match="names no configured teacher"):
        Router(RoutingConfig(field="family"), names)(ROWS[0], 0, "a", "src")  # 'add' is no teacher's name
    lenient = Router(RoutingConfig(field="family", map={"add": "weak"}, unmapped="default"), names)
    assert [lenient(r, i, r["id"], "src") for i, r in enumerate(ROWS)] == ["weak", "default", "default"]


def test_weights_draw_a_teacher_per_prompt_uid_deterministically_with_the_given_odds():
    weights = {"default": 1.0, "strong": 3.0}
    draws = [weighted_choice(weights, 7, f"uid{i}") for i in range(4000)]
    assert draws == [weighted_choice(dict(reversed(weights.items())), 7, f"uid{i}") for i in range(4000)]
    assert 0.72 < draws.count("strong") / len(draws) < 0.78
    assert draws != [weighted_choice(weights, 8, f"uid{i}") for i in range(4000)]  # the seed matters
    router = Router(RoutingConfig(weights=weights, seed=7), ("default", "strong"))
    assert router({}, 5, "uid3", "src") == draws[3]  # the row itself plays no part, only its uid


class ByteTokenizer:
    """Text to its bytes (no chat template): what ``load_prompt_dataset`` needs of a tokenizer."""

    chat_template = None

    def __call__(self, text, *, add_special_tokens):
        return {"input_ids": [list(t.encode()) for t in text]}


def test_prompts_carry_their_route_from_loading(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    router = Router(RoutingConfig(field="family", map={"add": "default", "mul": "weak"}), ("default", "weak"))
    cfg = DataConfig(path=str(path), id_field="id", apply_chat_template=False)
    assert [ex.route for ex in load_prompt_dataset(cfg, ByteTokenizer(), router)] == ["default", "weak"]
    assert [ex.route for ex in load_prompt_dataset(cfg, ByteTokenizer())] == ["default"] * 2


def _signal(rows: int, positions: int, k: int, fill: float) -> TeacherSignal:
    ids = torch.arange(k, dtype=torch.int32).expand(rows, positions, k).clone()
    return TeacherSignal(ids, torch.full((rows, positions, k), fill), torch.full((rows, positions), fill))


def test_teachers_may_have_their_own_top_k():
    cfg = compose("teacher.top_k=16", f"+teachers.weak.model={STUDENT}", "+teachers.weak.top_k=4",
                  "routing.field=family")
    assert (cfg.teachers["weak"].top_k, cfg.teacher.top_k) == (4, 16)


def test_signals_join_back_in_batch_order_and_a_smaller_k_is_padded_with_absent_slots():
    joined = join_by_rows([("a", [1, 3], _signal(2, 5, 4, -1.0)), ("b", [0, 2], _signal(2, 5, 4, -2.0))], 4)
    assert joined.sampled_logprobs[:, 0].tolist() == [-2.0, -1.0, -2.0, -1.0] and joined.k == 4
    mixed = join_by_rows([("a", [0], _signal(1, 5, 4, -1.0)), ("b", [1], _signal(1, 5, 3, -1.0))], 2)
    assert mixed.k == 4 and mixed.topk_ids[1, 0].tolist() == [0, 1, 2, 0]
    assert mixed.topk_logprobs[1, 0].tolist() == [-1.0, -1.0, -1.0, float("-inf")]
    assert mixed.absent_slots()[:, 0].tolist() == [[False] * 4, [False, False, False, True]]
    with pytest.raises(ValueError, match="every teacher must score the same positions"):
        join_by_rows([("a", [0], _signal(1, 5, 4, -1.0)), ("b", [1], _signal(1, 4, 4, -1.0))], 2)
    with pytest.raises(ValueError, match="exactly once"):
        join_by_rows([("a", [0], _signal(1, 5, 4, -1.0))], 2)


def test_each_row_is_scored_by_its_own_teacher_and_lands_in_its_place():
    teachers = {"default": FakeTeacher(16, 4), "weak": FakeTeacher(16, 4)}
    ids = torch.arange(5).unsqueeze(-1) * 100 + torch.arange(6)  # row i holds 100 i + t
    routes = ["weak", "default", "weak", "weak", "default"]
    signal = score_routed(teachers, routes, ids, torch.ones_like(ids), torch.zeros(5, dtype=torch.long))
    assert teachers["weak"].seen[0][:, 0].tolist() == [0, 200, 300]
    assert teachers["default"].seen[0][:, 0].tolist() == [100, 400]
    assert tuple(signal.topk_ids.shape) == (5, 5, 4)
    alone = teachers["weak"].score(ids[[0, 2, 3]], torch.ones(3, 6))  # the same seeded teacher, scored again
    assert teachers["weak"].scored == 2 and not torch.equal(alone.topk_logprobs, signal.topk_logprobs[[0, 2, 3]])
    with pytest.raises(ValueError, match=r"teachers \['strong'\]"):
        route_rows(["strong"], ["default"])


def test_teachers_generate_their_own_prompts_in_prompt_order():
    teachers = {"default": FakeTeacher(16, 4), "weak": FakeTeacher(16, 4)}
    engine = RoutedTeachers(teachers, ["weak", "default", "weak"])
    out = engine.generate([[1], [2], [3]], SamplingSettings(temperature=0.0))
    assert [g.prompt_index for g in out] == [0, 1, 2]
    assert teachers["weak"].prompted == [[[1], [3]]] and teachers["default"].prompted == [[[2]]]


def test_per_teacher_metrics_are_named_by_teacher():
    line = teacher_metrics(["default", "weak"], ["weak", "weak", "default"], {1: {"kept_fraction": 0.5}})
    assert line == {"teacher/default/sequences": 1, "teacher/weak/sequences": 2, "teacher/weak/kept_fraction": 0.5}


def test_every_teacher_pool_is_placed_and_must_fit_the_cluster():
    from tip_ray.runtime.placement import ResourceError, check_fits
    from tip_ray.runtime.ray_runtime import pool_resources

    cfg = compose(f"+teachers.weak.model={STUDENT}", "+teachers.weak.num_workers=3",
                  f"+teachers.big.model={TEACHER}", "+cluster.teachers.big.cpus=4", "+routing.weights.weak=1",
                  "+routing.weights.big=1")
    pools = pool_resources(cfg)
    assert (pools["teacher.weak"].num_actors, pools["teacher.weak"].cpus) == (3, cfg.cluster.teacher.cpus)
    assert pools["teacher.big"].cpus == 4 and pools["teacher.big"].name == "teacher.big"
    demand = sum(p.total()["CPU"] for p in pools.values())
    check_fits(list(pools.values()), {"CPU": demand})
    with pytest.raises(ResourceError, match="teacher.big: 1 x"):
        check_fits(list(pools.values()), {"CPU": demand - 1})


def test_an_evaluation_splits_by_teacher_with_each_samples_own_tokens():
    gens = tuple(Generation(i, [1] * n, [], "stop") for i, n in enumerate((2, 3, 1)))
    rkl = torch.tensor([1.0, 1.0, 4.0, 4.0, 4.0, 7.0], dtype=torch.float64)
    held = HeldOutEval(gens, (True, False, None), rkl, torch.tensor([True, False, True, True, True, False]))
    metrics = routed(held, ["a", "b", "a"]).metrics()
    assert metrics["eval/rkl"] == pytest.approx(3.5) and metrics["eval/accuracy"] == 0.5
    assert metrics["eval/teacher/a/rkl"] == pytest.approx(9 / 3) and metrics["eval/teacher/b/rkl"] == 4.0
    assert (metrics["eval/teacher/a/accuracy"], metrics["eval/teacher/a/graded"]) == (1.0, 1)
    assert metrics["eval/teacher/b/accuracy"] == 0.0 and metrics["eval/teacher/a/teacher_agreement"] == 1 / 3


def test_the_trainer_checks_every_teacher_and_every_row_before_any_pool_starts(tmp_path):
    from driver_fakes import make_trainer, train_config, write_data

    from tip_ray.state.preflight import CheckpointError

    data = write_data(tmp_path / "data")
    routes = ("routing.field=family", "+routing.map.add=default", "+routing.map.mul=weak")
    with pytest.raises(CheckpointError, match="teachers.weak checkpoint"):
        make_trainer(train_config(tmp_path / "a", data, f"+teachers.weak.model={tmp_path / 'none'}", *routes))
    with pytest.raises(ValueError, match="the largest is the student's whole vocabulary"):
        make_trainer(train_config(tmp_path / "c", data, f"+teachers.weak.model={STUDENT}", "+teachers.weak.top_k=128",
                                  *routes))
    with pytest.raises(DataError, match=r"train.jsonl: row \d+ has routing.field 'family' = 'mul'"):
        make_trainer(train_config(tmp_path / "b", data, f"+teachers.weak.model={STUDENT}", "routing.field=family",
                                  "+routing.map.add=weak"))
