"""Atomic checkpoints: complete ones are found, interrupted or damaged ones never are."""

from __future__ import annotations

import json

import pytest

from tip_ray.checkpoint_store import CheckpointStore, step_name
from tip_ray.resume import ResumeError, config_differences, find_resume_point
from tip_ray.tracking import truncate_after


def save(store: CheckpointStore, step: int, payload: bytes = b"weights") -> None:
    tmp = store.begin(step)
    (tmp / "learner").mkdir()
    (tmp / "learner" / "shard.pt").write_bytes(payload)
    store.finish(tmp, step, {"step": step, "cursor": {"epoch": 0, "position": 8 * step}})


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
    with pytest.raises(ResumeError, match="selection"):
        find_resume_point("auto", store, tmp_path, other)
    assert config_differences(saved, other) == [
        "selection: {'rule': 'soft_or', 'ratio': 0.5} -> {'rule': 'all', 'ratio': None}"]


def test_the_metrics_log_is_cut_back_to_the_checkpoint_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(6)) + '{"step": 6, "lo')
    assert truncate_after(path, 3) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2, 3]
