"""Atomic checkpoints: complete ones are found, interrupted or damaged ones never are; a run
resumes from one only with the identity (``tip_ray.state.resume.IDENTITY_KEYS``) it was written with."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any

import pytest

from tip_ray.cli import compose
from tip_ray.config import identity
from tip_ray.state.checkpoint_store import CheckpointStore, step_name
from tip_ray.state.resume import (
    IDENTITY_KEYS,
    ResumeError,
    config_differences,
    find_resume_point,
    identity_keys,
    unresolved_keys,
)
from tip_ray.tracking import truncate_after


def save(store: CheckpointStore, step: int, payload: bytes = b"weights", config: dict | None = None) -> None:
    tmp = store.begin(step)
    (tmp / "learner").mkdir()
    (tmp / "learner" / "shard.pt").write_bytes(payload)
    driver = {"step": step, "cursor": {"epoch": 0, "position": 8 * step}}
    store.finish(tmp, step, driver if config is None else {**driver, "config": config})


def test_the_newest_complete_checkpoint_is_found_and_old_ones_are_pruned(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", keep_last=2)
    assert store.latest() is None
    for step in (2, 4, 6):
        save(store, step)
    latest = store.latest()
    assert latest.step == 6 and latest.driver["cursor"] == {"epoch": 0, "position": 48}
    assert sorted(p.name for p in store.root.iterdir()) == [step_name(4), step_name(6)]
    assert (latest.learner_dir / "shard.pt").read_bytes() == b"weights"


def test_an_interrupted_save_is_never_picked_up(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    save(store, 2)
    tmp = store.begin(4)  # a crash after writing part of step 4, before the rename
    (tmp / "learner").mkdir()
    (tmp / "learner" / "shard.pt").write_bytes(b"half")
    assert store.latest().step == 2
    assert tmp in store.incomplete()


def test_a_truncated_or_manifestless_directory_is_skipped(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    save(store, 2)
    save(store, 4, payload=b"0123456789")
    # damage step 4 after the fact: a truncated file no longer matches its manifest
    (store.root / step_name(4) / "learner" / "shard.pt").write_bytes(b"01234")
    # and a step-6 directory without a manifest (copied by hand, cut short)
    (store.root / step_name(6) / "learner").mkdir(parents=True)
    assert store.latest().step == 2
    assert {p.name for p in store.incomplete()} == {step_name(4), step_name(6)}
    with pytest.raises(ValueError, match="not a complete tip_ray checkpoint"):
        store.load(store.root / step_name(6))


def test_saving_a_step_again_replaces_it_only_once_complete(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    save(store, 2, payload=b"old")
    save(store, 2, payload=b"new")
    assert (store.latest().learner_dir / "shard.pt").read_bytes() == b"new"
    assert [p.name for p in store.root.iterdir()] == [step_name(2)]


def test_stale_temporary_directories_of_a_crashed_process_are_removed_on_the_next_save(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    stale = store.root / ".tmp-step_00000004-999999999"
    stale.mkdir(parents=True)
    save(store, 6)
    assert not stale.exists() and store.latest().step == 6


def test_resume_never_refuses_a_directory_with_checkpoints(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    assert find_resume_point("never", store, tmp_path, {}) is None
    save(store, 2)
    with pytest.raises(ResumeError, match="already holds checkpoints"):
        find_resume_point("never", store, tmp_path, {})
    assert find_resume_point("auto", store, tmp_path, {}).step == 2
    assert find_resume_point(str(store.root / step_name(2)), store, tmp_path, {}).step == 2
    with pytest.raises(ResumeError, match="not a complete"):
        find_resume_point(str(tmp_path / "nowhere"), store, tmp_path, {})


def test_resume_refuses_a_run_with_other_settings(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    save(store, 2)
    saved = {"student": "s", "selection": {"rule": "soft_or", "ratio": 0.5}, "trainer": {"steps": 10}}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    longer = {**saved, "trainer": {"steps": 20}}  # running longer is the same run
    assert find_resume_point("auto", store, tmp_path, longer).step == 2
    other = {**saved, "selection": {"rule": "all", "ratio": None}}
    with pytest.raises(ResumeError, match="selection.rule: 'soft_or' -> 'all'; selection.ratio: 0.5 -> None"):
        find_resume_point("auto", store, tmp_path, other)
    assert config_differences(saved, other) == ["selection.rule: 'soft_or' -> 'all'", "selection.ratio: 0.5 -> None"]


def test_the_grader_is_part_of_a_rewarded_runs_identity_only():
    plain = {"grader": "exact", "loss": {"reward": {"enabled": False}}}
    assert config_differences(plain, {**plain, "grader": "math"}) == []  # it only evaluates
    rewarded = {"grader": "exact", "loss": {"reward": {"enabled": True}}}
    assert config_differences(rewarded, {**rewarded, "grader": "math"}) == ["grader: 'exact' -> 'math'"]
    assert "grader: 'exact' -> 'math'" in config_differences(plain, {**rewarded, "grader": "math"})


@pytest.fixture(scope="module")
def default_config() -> dict[str, Any]:
    """The composed default training config, resolved as the trainer saves it with its checkpoints."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(compose("train", [])), resolve=True)


def changed(config: dict[str, Any], dotted: str, value: Any = None, drop: bool = False) -> dict[str, Any]:
    """A deep copy of ``config`` with ``dotted`` set to ``value`` (or removed, with ``drop``)."""
    out = copy.deepcopy(config)
    *parents, last = dotted.split(".")
    node = out
    for part in parents:
        node = node[part]
    if drop:
        del node[last]
    else:
        node[last] = value
    return out


def test_every_identity_key_resolves_on_a_composed_default_config(default_config):
    assert unresolved_keys(default_config) == []
    assert {"student", "teacher.model", "teacher.top_k", "teacher.dtype", "learner.ta_k", "learner.lr",
            "data.chat_template_kwargs", "data.null_answer", "selection.rule", "selection.params", "loss.kind",
            "rollout.seed", "trainer.prompts_per_step"} <= set(IDENTITY_KEYS)
    # how a run is executed, evaluated and logged may change on resume
    assert not {"trainer.steps", "trainer.eval_every", "trainer.output_dir", "learner.chunk_rows",
                "teacher.num_workers"} & set(IDENTITY_KEYS)
    assert not [k for k in IDENTITY_KEYS
                if k.split(".")[0] in ("eval_data", "grader", "cluster", "checkpoint", "logger", "sync", "faults")]


# The identity as a hand-written list of dotted keys, before it was declared on the config fields:
# every key of it is still compared ("selection" and "loss" were whole sections).
_OLD_IDENTITY_KEYS = (
    "student", "teacher.model", "teacher.top_k", "data.path", "data.split", "data.seed", "data.shuffle",
    "data.limit", "rollout.n", "rollout.temperature", "rollout.top_p", "rollout.max_new_tokens", "rollout.seed",
    "data.format", "data.prompt_field", "data.answer_field", "data.prompt_template", "data.system_prompt",
    "data.apply_chat_template", "data.max_prompt_tokens", "data.on_overlong", "rollout.engine",
    "teacher.backend", "teacher.values_dtype",
    "learner.world_size", "learner.zero_stage", "learner.dtype", "learner.optimizer", "learner.lr",
    "learner.weight_decay", "learner.betas", "learner.lr_schedule", "learner.warmup_steps", "learner.total_steps",
    "learner.min_lr_ratio", "learner.grad_clip", "learner.global_batch_size", "learner.micro_batch_size",
    "learner.seed", "selection", "loss", "trainer.prompts_per_step", "trainer.sync_every", "trainer.mode",
)


def test_the_identity_still_holds_every_key_of_the_old_list(default_config):
    for old in _OLD_IDENTITY_KEYS:
        covered = [k for k in IDENTITY_KEYS if k == old or k.startswith(old + ".")]
        assert covered, old
    for section in ("selection", "loss"):  # every setting of them, nested ones (loss.reward.*) included
        for name in default_config[section]:
            assert [k for k in IDENTITY_KEYS if k == f"{section}.{name}" or k.startswith(f"{section}.{name}.")], name


def test_a_renamed_or_missing_field_fails_to_resolve(default_config):
    renamed = changed(default_config, "learner.lr", drop=True)
    renamed["learner"]["learning_rate"] = default_config["learner"]["lr"]
    assert unresolved_keys(renamed) == ["learner.lr"]
    assert unresolved_keys(default_config, ["student", "learner.learning_rate", "nowhere.lr"]) == [
        "learner.learning_rate", "nowhere.lr"]


@dataclass
class _Inner:
    kept: int = identity(1)
    free: int = 2


@dataclass
class _Outer:
    name: str = identity()
    inner: _Inner = identity(default_factory=_Inner)
    other: _Inner | None = None  # unmarked: its marked fields do not count
    note: str = ""


def test_identity_keys_follow_the_field_declarations():
    assert identity_keys(_Outer) == ("name", "inner.kept")


def test_an_old_checkpoint_without_the_new_identity_keys_still_resumes(tmp_path, default_config):
    old = default_config
    for key in ("learner.ta_k", "teacher.dtype", "data.chat_template_kwargs", "data.null_answer"):
        old = changed(old, key, drop=True)
    store = CheckpointStore(tmp_path / "ckpt")
    save(store, 2, config=old)
    assert find_resume_point("auto", store, tmp_path, default_config).step == 2
    lr = default_config["learner"]["lr"]
    with pytest.raises(ResumeError, match=re.escape(f"learner.lr: {lr!r} -> {2 * lr!r}")):
        find_resume_point("auto", store, tmp_path, changed(default_config, "learner.lr", 2 * lr))


@pytest.mark.parametrize("key, value", [("learner.ta_k", 8), ("teacher.dtype", "bfloat16"),
                                        ("data.null_answer", "ungraded"), ("data.chat_template_kwargs", {"x": 1}),
                                        ("selection.ratio", 0.2), ("loss.beta", 0.1), ("rollout.seed", 7)])
def test_a_change_to_an_identity_key_is_refused_naming_the_key(tmp_path, default_config, key, value):
    store = CheckpointStore(tmp_path / "ckpt")
    save(store, 2, config=default_config)
    with pytest.raises(ResumeError, match=rf"holds a run with other settings than this one \({re.escape(key)}: "):
        find_resume_point("auto", store, tmp_path, changed(default_config, key, value))


def test_execution_settings_may_change_on_resume(tmp_path, default_config):
    store = CheckpointStore(tmp_path / "ckpt")
    save(store, 2, config=default_config)
    current = default_config
    for key, value in (("trainer.steps", 500), ("trainer.eval_every", 5), ("logger.wandb", False),
                       ("cluster.num_cpus", 3), ("learner.chunk_rows", 64)):
        current = changed(current, key, value)
    assert find_resume_point("auto", store, tmp_path, current).step == 2


def test_the_metrics_log_is_cut_back_to_the_checkpoint_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(6)) + '{"step": 6, "lo')
    assert truncate_after(path, 3) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2, 3]


def save_hf(store: CheckpointStore, step: int) -> None:
    tmp = store.begin(step, hf=True)
    (tmp / "model.safetensors").write_bytes(b"export")
    store.finish_hf(tmp, step)


def test_resuming_an_older_checkpoint_sets_the_later_ones_aside(tmp_path, caplog):
    # Steps 2, 4, 6 saved; the run goes back to 2. Left in place, step 4 would be replaced by
    # the new run's step 4, step 6 kept beside it, and `auto` would later pick the old step 6.
    store = CheckpointStore(tmp_path / "ckpt", keep_last=3)
    for step in (2, 4, 6):
        save(store, step, payload=f"w{step}".encode())
        save_hf(store, step)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 7)))
    with caplog.at_level("WARNING", logger="tip_ray.state.resume"):
        point = find_resume_point(str(store.root / step_name(2)), store, tmp_path, {})
    assert point.step == 2 and point.path == store.root / step_name(2)
    aside = point.set_aside
    assert aside.parent == store.root / "superseded" and aside.name.endswith(f"-from-{step_name(2)}")
    # Moved, not deleted: every file is there, and the abandoned branch's metric lines too.
    assert sorted(p.name for p in aside.iterdir()) == ["hf", "metrics.jsonl", step_name(4), step_name(6)]
    assert (aside / step_name(6) / "learner" / "shard.pt").read_bytes() == b"w6"
    assert sorted(p.name for p in (aside / "hf").iterdir()) == [step_name(4), step_name(6)]
    assert len((aside / "metrics.jsonl").read_text().splitlines()) == 6
    # The store now holds only the resumed point and its export; the moved ones are never read.
    assert store.latest().step == 2 and store.incomplete() == []
    assert sorted(p.name for p in (store.root / "hf").iterdir()) == [step_name(2)]
    assert f"goes back to step 2, but {store.root} held later checkpoints" in caplog.text
    assert step_name(4) in caplog.text and str(aside) in caplog.text
    save(store, 4, payload=b"new4")  # the resumed run's own step 4 does not meet the old one
    assert (store.latest().learner_dir / "shard.pt").read_bytes() == b"new4"


def test_resuming_the_newest_or_by_auto_moves_nothing(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", keep_last=3)
    for step in (2, 4):
        save(store, step)
    assert find_resume_point(str(store.root / step_name(4)), store, tmp_path, {}).set_aside is None
    assert find_resume_point("auto", store, tmp_path, {}).set_aside is None
    assert not (store.root / "superseded").exists()


def test_a_checkpoint_from_elsewhere_sets_aside_this_stores_own_of_its_step_and_later(tmp_path):
    # Resuming another directory's step 4 into a store holding 2, 4 and 6: this store's 4 and 6
    # would be picked up by a later `auto` in place of the resumed run's.
    elsewhere = CheckpointStore(tmp_path / "other")
    save(elsewhere, 4, payload=b"theirs")
    store = CheckpointStore(tmp_path / "ckpt", keep_last=3)
    for step in (2, 4, 6):
        save(store, step)
    point = find_resume_point(str(elsewhere.root / step_name(4)), store, tmp_path, {})
    assert point.path == elsewhere.root / step_name(4)
    assert sorted(p.name for p in point.set_aside.iterdir()) == [step_name(4), step_name(6)]
    assert store.latest().step == 2 and elsewhere.latest().step == 4
