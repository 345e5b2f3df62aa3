"""The sweep report on synthetic run directories with hand-computed numbers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tip_ray.experiments.claims import check_claims, noise_text
from tip_ray.experiments.provenance import reproduce_commands, setup_text
from tip_ray.experiments.report import collapse_notes, curve_table, end_state_table, main, results_table, write_report
from tip_ray.experiments.scores import (
    METRICS,
    ReportError,
    choose_metric,
    collect_runs,
    load_run,
    shown_metrics,
    summarize,
)
from tip_ray.tip.rocks import build_rock_set, save_rock_set


def write_run(root, arm, seed, rule, ratio, after, *, before=0.2, mid=0.5, kept=(100, 100), valid=(100, 100),
              memory=(500.0, 520.0), wall=100.0, direction="top", finished=True):
    """A run directory as `tip-ray sweep` leaves it: 2 steps, evaluated at steps 0, 1 and 2."""
    run = root / arm / f"seed{seed}"
    run.mkdir(parents=True)
    config = {"student": "s", "teacher": {"model": "t"}, "selection": {"rule": rule, "ratio": ratio,
                                                                        "direction": direction},
              "trainer": {"steps": 2, "prompts_per_step": 4, "eval_every": 1}, "rollout": {"n": 1},
              "learner": {}, "loss": {"kind": "rkl"}, "eval_data": {"limit": 10, "path": "test.jsonl"}}
    (run / "config.json").write_text(json.dumps(config))
    rows = [{"step": 0, "eval/accuracy": before}]
    for step in (1, 2):
        row = {"step": step, "loss": 1.0, "kept_tokens": kept[step - 1], "valid_tokens": valid[step - 1],
               "kept_fraction": kept[step - 1] / valid[step - 1], "learner_peak_memory_mb": memory[step - 1]}
        if step == 1:
            row["eval/accuracy"] = mid
        rows.append(row)
    rows.append({"step": 2, "eval/accuracy": after})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        (run / "summary.json").write_text(json.dumps({"accuracy_before": before, "accuracy_after": after, "steps": 2}))
        command = ["python", "-m", "tip_ray.cli", "train", "trainer.steps=2", f"selection.rule={rule}",
                   f"selection.ratio={ratio}", f"data.seed={seed}", f"trainer.output_dir=sweep/{arm}/seed{seed}"]
        (run / "sweep_run.json").write_text(json.dumps({"wall_seconds": wall, "returncode": 0, "command": command}))
    return run


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    for seed, (after, mid, wall) in enumerate([(0.6, 0.5, 100.0), (0.7, 0.55, 110.0), (0.8, 0.6, 120.0)]):
        write_run(root, "all_100", seed, "all", 1.0, after, mid=mid, wall=wall)
    for seed, after in enumerate([0.75, 0.85]):
        write_run(root, "soft_or_50", seed, "soft_or", 0.5, after, kept=(50, 50), memory=(400.0, 410.0))
    write_run(root, "random_50", 0, "random", 0.5, 0.4, kept=(60, 40), valid=(120, 80))
    write_run(root, "random_50", 1, "random", 0.5, 0.9, finished=False)  # still running: not reported
    return root


def test_runs_are_read_with_their_curves_tokens_and_memory(sweep):
    run = load_run(sweep / "all_100" / "seed1")
    assert (run.arm, run.seed, run.rule, run.ratio) == ("all_100", 1, "all", 1.0)
    assert run.scores["accuracy"].curve == ((0, 0.2), (1, 0.55), (2, 0.7))
    assert (run.kept_tokens, run.valid_tokens, run.kept_fraction, run.steps) == (200, 200, 1.0, 2)
    assert run.peak_memory_mb == 520.0 and run.wall_seconds == 110.0
    assert len(collect_runs(sweep)) == 6  # the unfinished random_50/seed1 is left out


def test_arm_means_std_and_gain_recovered(sweep):
    arms = {s.arm: s for s in summarize(collect_runs(sweep))}
    assert list(arms) == ["all_100", "soft_or_50", "random_50"]  # the sweep's arm order
    a, s, r = (arms[n].scores["accuracy"] for n in ("all_100", "soft_or_50", "random_50"))
    assert a.final == pytest.approx(0.7) and a.std == pytest.approx(0.1) and a.before == pytest.approx(0.2)
    assert s.final == pytest.approx(0.8) and s.std == pytest.approx(math.sqrt(0.005))
    assert r.std is None and arms["random_50"].seeds == (0,)
    assert a.recovered == pytest.approx(1.0)
    assert s.recovered == pytest.approx((0.8 - 0.2) / (0.7 - 0.2))
    assert r.recovered == pytest.approx((0.4 - 0.2) / 0.5)
    soft, rand, base = arms["soft_or_50"], arms["random_50"], arms["all_100"]
    assert (soft.kept_tokens, soft.kept_fraction, soft.peak_memory_mb) == (100, 0.5, 410.0)
    assert rand.kept_fraction == pytest.approx(0.5)  # mean of the per-step fractions 60/120 and 40/80
    assert base.wall_seconds == pytest.approx(110.0)
    assert [c[0] for c in a.curve] == [0, 1, 2]
    assert a.curve[1][1] == pytest.approx(0.55) and a.curve[1][2] == pytest.approx(0.05)


def test_table_rows_carry_the_numbers(sweep):
    table = results_table(summarize(collect_runs(sweep))).splitlines()
    assert table[2] == "| all_100 | `all` | 1 | 3 | 200 | 100.0% | 70.0 ± 10.0 | 1.00 | 520 | 110 |"
    assert table[3] == "| soft_or_50 | `soft_or` | 0.5 | 2 | 100 | 50.0% | 80.0 ± 7.1 | 1.20 | 410 | 100 |"
    assert table[4] == "| random_50 | `random` | 0.5 | 1 | 100 | 50.0% | 40.0 | 0.40 | 520 | 100 |"


def test_claims_are_judged_with_the_seed_noise(sweep):
    claims = {c.statement: c for c in check_claims(summarize(collect_runs(sweep)))}
    better = claims["soft_or 50% is at least as good as all tokens"]
    assert better.verdict == "agrees"
    # difference 0.1 vs standard error sqrt(0.01/3 + 0.005/2) = 0.076: not beyond noise
    assert not better.clear and "+10.0 pp" in better.detail and "7.6 pp" in better.detail
    control = claims["random 50% is worse than soft_or 50% (same budget)"]
    assert control.verdict == "agrees" and control.clear is None  # one random seed: no spread to judge by
    assert not any("entropy" in name for name in claims)  # arms not in the sweep are not judged


def test_the_commands_that_reproduce_the_sweep_keep_its_shared_overrides_only(sweep):
    assert reproduce_commands(collect_runs(sweep)) == [
        "tip-ray sweep --root sweep --seeds 0 1 2 --arms all_100,soft_or_50,random_50 trainer.steps=2",
        "tip-ray report --root sweep --out docs/results.md",
    ]


def test_the_report_page_and_figures_are_written(sweep, tmp_path):
    out = write_report(sweep, tmp_path / "docs" / "results.md", command="tip-ray report --root X --out Y")
    text = out.read_text()
    assert "tip-ray report --root X --out Y" in text
    assert "| soft_or_50 | `soft_or` | 0.5 | 2 | 100 | 50.0% | 80.0 ± 7.1 | 1.20 | 410 | 100 |" in text
    assert "**agrees**" in text
    for name in ("sweep_accuracy_vs_step.png", "sweep_accuracy_vs_budget.png"):
        png = tmp_path / "docs" / "figures" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert f"(figures/{name})" in text


def test_hand_written_notes_are_included_and_named_in_the_commands(sweep, tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("soft_or bottom collapses because ...\n")
    text = write_report(sweep, tmp_path / "results.md", notes=notes).read_text()
    assert f"## Analysis (hand-written, from `{notes}`)" in text and "soft_or bottom collapses because ..." in text
    assert f"tip-ray report --root sweep --out docs/results.md --notes {notes}" in text
    with pytest.raises(ReportError, match="no such file"):
        write_report(sweep, tmp_path / "other.md", notes=tmp_path / "missing.md")


def test_a_run_stopped_before_its_last_step_is_left_out(tmp_path):
    root = tmp_path / "sweep"
    write_run(root, "all_100", 0, "all", 1.0, 0.6)
    stopped = write_run(root, "all_100", 1, "all", 1.0, 0.7)
    # a signal stopped it after step 1 of 2: the trainer still wrote a summary
    (stopped / "summary.json").write_text(json.dumps({"accuracy_before": 0.2, "accuracy_after": 0.5, "steps": 1}))
    assert [r.seed for r in collect_runs(root)] == [0]


def test_unreadable_runs_are_named(tmp_path):
    run = write_run(tmp_path, "all_100", 0, "all", 1.0, 0.5)
    (run / "metrics.jsonl").write_text("{broken\n")
    with pytest.raises(ReportError, match="metrics.jsonl"):
        load_run(run)
    with pytest.raises(ReportError, match="is not a directory"):
        collect_runs(tmp_path / "missing")
    with pytest.raises(ReportError, match="no finished runs"):
        summarize([])


def test_the_curve_table_has_the_mean_accuracy_at_every_evaluated_step(sweep):
    rows = curve_table(summarize(collect_runs(sweep))).splitlines()
    assert rows[0] == "| arm | step 0 | step 1 | step 2 |"
    assert rows[2] == "| all_100 | 20.0 | 55.0 | 70.0 |"
    assert rows[4] == "| random_50 | 20.0 | 50.0 | 40.0 |"


def test_the_end_state_averages_the_last_tenth_of_the_steps_then_the_seeds(sweep):
    for seed, rkl in enumerate([0.5, 0.7]):
        path = sweep / "soft_or_50" / f"seed{seed}" / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for r in rows:
            if "kept_tokens" in r:
                r.update(rkl_mean=9.0 if r["step"] == 1 else rkl, entropy_mean=0.1, response_length=40.0,
                         truncated=seed)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    arms = {s.arm: s for s in summarize(collect_runs(sweep))}
    assert arms["soft_or_50"].end_state == pytest.approx(  # 2 steps: the last tenth is the last step
        {"rkl_mean": 0.6, "entropy_mean": 0.1, "response_length": 40.0, "truncated": 0.5})
    assert arms["all_100"].end_state == {}  # these runs logged none of the diagnostics
    rows = end_state_table(summarize(collect_runs(sweep))).splitlines()
    assert rows[3] == "| soft_or_50 | 0.600 | 0.100 | 40.0 | 0.5 |" and rows[2] == "| all_100 | - | - | - | - |"


def test_an_arm_that_ends_below_its_start_gets_a_note_with_its_end_state(sweep):
    path = sweep / "random_50" / "seed0" / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        if "kept_tokens" in r:
            r.update(rkl_mean=2.5, entropy_mean=0.1, response_length=90.0, truncated=30)
        elif r["step"] == 2:
            r["eval/accuracy"] = 0.1
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = json.loads((path.parent / "summary.json").read_text())
    (path.parent / "summary.json").write_text(json.dumps({**summary, "accuracy_after": 0.1}))
    notes = [n for n in collapse_notes(summarize(collect_runs(sweep))) if n]
    assert notes == ["random_50 ends below its starting accuracy (10.0% vs 20.0%). At the end its KL(student‖teacher) "
                     "per token is 2.500, its responses average 90.0 tokens and 30.0 per step hit the length limit."]


def to_kl_run(run, rkl, agreement=None, accuracy=False):
    """Turn a run of `write_run` into one that logged the held-out reverse KL (and agreement) at
    its three evaluations (`rkl`, `agreement`: before, step 1, after), as the trainer writes them:
    per row of metrics.jsonl and in summary.json's eval_before/eval_after; without accuracy
    unless `accuracy`."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/accuracy" in r]
    for i, r in enumerate(evals):
        r["eval/rkl"] = rkl[i]
        if agreement is not None:
            r["eval/teacher_agreement"] = agreement[i]
        if not accuracy:
            del r["eval/accuracy"]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = json.loads((run / "summary.json").read_text())
    keys = [k for k in ("eval/accuracy", "eval/rkl", "eval/teacher_agreement") if k in evals[0]]
    summary.update(eval_before={k: evals[0][k] for k in keys}, eval_after={k: evals[-1][k] for k in keys})
    if not accuracy:
        summary.update(accuracy_before=None, accuracy_after=None)
    (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture
def kl_sweep(tmp_path):
    """The `sweep` fixture's arms and seeds with held-out reverse KL and agreement, no accuracy."""
    root = tmp_path / "kl_sweep"
    for seed, (kl, agree, wall) in enumerate([(0.5, 0.7, 100.0), (0.6, 0.75, 110.0), (0.7, 0.8, 120.0)]):
        to_kl_run(write_run(root, "all_100", seed, "all", 1.0, 0.0, wall=wall), (1.0, 0.8, kl), (0.5, 0.6, agree))
    for seed, (kl, agree) in enumerate([(0.45, 0.8), (0.55, 0.9)]):
        to_kl_run(write_run(root, "soft_or_50", seed, "soft_or", 0.5, 0.0, kept=(50, 50), memory=(400.0, 410.0)),
                  (1.0, 0.7, kl), (0.5, 0.65, agree))
    to_kl_run(write_run(root, "random_50", 0, "random", 0.5, 0.0, kept=(60, 40), valid=(120, 80)),
              (1.0, 0.9, 0.8), (0.5, 0.55, 0.6))
    return root


def test_a_run_without_accuracy_but_with_held_out_kl_is_read(kl_sweep):
    run = load_run(kl_sweep / "all_100" / "seed1")
    assert set(run.scores) == {"rkl", "agreement"}  # no accuracy logged
    assert (run.scores["rkl"].before, run.scores["rkl"].after) == (1.0, 0.6)
    assert run.scores["rkl"].curve == ((0, 1.0), (1, 0.8), (2, 0.6))
    assert run.scores["agreement"].curve == ((0, 0.5), (1, 0.6), (2, 0.75))


def test_kl_gap_closed_and_final_agreement_per_arm(kl_sweep):
    summaries = summarize(collect_runs(kl_sweep))
    arms = {s.arm: s.scores for s in summaries}
    a, s, r = arms["all_100"]["rkl"], arms["soft_or_50"]["rkl"], arms["random_50"]["rkl"]
    assert a.final == pytest.approx(0.6) and a.std == pytest.approx(0.1) and a.before == 1.0
    assert s.final == pytest.approx(0.5) and s.std == pytest.approx(math.sqrt(0.005)) and r.std is None
    # (kl_before - kl_arm) / (kl_before - kl_all) with kl_before = 1.0 and kl_all = 0.6
    assert a.recovered == pytest.approx(1.0)
    assert s.recovered == pytest.approx((1.0 - 0.5) / (1.0 - 0.6))
    assert r.recovered == pytest.approx((1.0 - 0.8) / (1.0 - 0.6))
    assert arms["soft_or_50"]["agreement"].final == pytest.approx(0.85)
    assert "accuracy" not in arms["all_100"]
    assert choose_metric(summaries) == "rkl"  # no accuracy: KL is the default primary metric
    with pytest.raises(ReportError, match="--metric accuracy: not every run logged eval/accuracy"):
        choose_metric(summaries, "accuracy")


def test_the_kl_tables_carry_the_numbers(kl_sweep):
    summaries = summarize(collect_runs(kl_sweep))
    table = results_table(summaries).splitlines()
    assert table[0] == ("| arm | rule | ratio | seeds | tokens trained (kept) | kept | final held-out KL (mean ± std) "
                        "| KL gap closed vs all | final agreement % (mean ± std) | peak learner memory MB "
                        "| wall time s |")
    assert table[2] == "| all_100 | `all` | 1 | 3 | 200 | 100.0% | 0.600 ± 0.100 | 1.00 | 75.0 ± 5.0 | 520 | 110 |"
    assert table[3] == "| soft_or_50 | `soft_or` | 0.5 | 2 | 100 | 50.0% | 0.500 ± 0.071 | 1.25 | 85.0 ± 7.1 | 410 | 100 |"
    assert table[4] == "| random_50 | `random` | 0.5 | 1 | 100 | 50.0% | 0.800 | 0.50 | 60.0 | 520 | 100 |"
    kl = curve_table(summaries, "rkl").splitlines()
    assert kl[0] == "| arm | step 0 | step 1 | step 2 |"
    assert kl[2] == "| all_100 | 1.000 | 0.800 | 0.600 |" and kl[3] == "| soft_or_50 | 1.000 | 0.700 | 0.500 |"
    agreement = curve_table(summaries, "agreement").splitlines()
    assert agreement[2] == "| all_100 | 50.0 | 60.0 | 75.0 |" and agreement[4] == "| random_50 | 50.0 | 55.0 | 60.0 |"


def test_claims_are_judged_on_kl_where_lower_is_better(kl_sweep):
    summaries = summarize(collect_runs(kl_sweep))
    claims = {c.statement: c for c in check_claims(summaries, "rkl")}
    better = claims["soft_or 50% is at least as good as all tokens"]
    # KL 0.5 vs 0.6: lower is better, so soft_or agrees; standard error sqrt(0.01/3 + 0.005/2) = 0.076
    assert better.verdict == "agrees" and not better.clear
    assert better.detail == "soft_or_50 0.500 vs all_100 0.600: difference -0.100, standard error 0.076"
    control = claims["random 50% is worse than soft_or 50% (same budget)"]
    assert control.verdict == "agrees" and control.clear is None and "difference +0.300" in control.detail


def test_a_kl_report_names_its_figures_after_the_page_and_lists_its_commands(tmp_path):
    root = tmp_path / "sweep"
    for seed, kl in enumerate([0.6, 0.7]):  # accuracy is logged too, but --metric rkl makes KL the primary metric
        to_kl_run(write_run(root, "all_100", seed, "all", 1.0, 0.0, before=0.0, mid=0.0), (1.0, 0.8, kl),
                  (0.5, 0.6, 0.7), accuracy=True)
    for seed, kl in enumerate([0.8, 0.9]):
        to_kl_run(write_run(root, "overconfident_10", seed, "overconfident", 0.1, 0.0, before=0.0, mid=0.0,
                            kept=(10, 10)), (1.0, 0.9, kl), (0.5, 0.55, 0.6), accuracy=True)
    notes = tmp_path / "notes.md"
    notes.write_text("KL is the evidence here.\n")
    text = write_report(root, tmp_path / "docs" / "results_real.md", command="tip-ray report X", notes=notes,
                        metric="rkl").read_text()
    assert f"tip-ray report --root sweep --out docs/results_real.md --notes {notes} --metric rkl" in text
    assert "| final held-out KL (mean ± std) | KL gap closed vs all | final agreement % (mean ± std) " \
           "| final accuracy % (mean ± std) | gain recovered vs all |" in text
    assert "| all_100 | `all` | 1 | 2 | 200 | 100.0% | 0.650 ± 0.071 | 1.00 | 70.0 ± 0.0 | 0.0 ± 0.0 | - |" in text
    assert "KL gap closed = (kl_before - kl_arm) / (kl_before - kl_all)" in text
    assert "judged on the final held-out KL (lower is better)" in text
    # (1.0 - 0.85) / (1.0 - 0.65) of the KL gap: short of 90%
    assert ("overconfident (Q3) at 10% nearly matches all tokens (closes >= 90% of its KL gap) | "
            "TIP: 76.1 at under 10% vs 76.7 | **does not agree**: closes 0.43 of the KL gap; 0.850 vs 0.650") in text
    assert "embedded" not in text and "vocabulary here is 128" not in text and "rock" not in text
    figures = tmp_path / "docs" / "figures"
    for metric in ("rkl", "agreement", "accuracy"):
        for kind in ("step", "budget"):
            png = figures / f"results_real_{metric}_vs_{kind}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"(figures/{png.name})" in text
    assert not list(figures.glob("sweep_*"))  # docs/results.md's figures are left alone
    assert text.index("Held-out reverse KL per token") < text.index("Held-out accuracy during training")


def test_the_report_command_takes_the_metric(kl_sweep, tmp_path, capsys):
    out = tmp_path / "docs" / "results_kl.md"
    assert main(["--root", str(kl_sweep), "--out", str(out), "--metric", "rkl"]) == 0
    assert f"--out {out} --metric rkl`" in out.read_text()
    assert "| final held-out KL (mean ± std) |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--metric accuracy: not every run logged eval/accuracy"):
        main(["--root", str(kl_sweep), "--out", str(out), "--metric", "accuracy"])


def test_a_run_with_neither_accuracy_nor_kl_is_an_error(tmp_path):
    run = write_run(tmp_path, "all_100", 0, "all", 1.0, 0.5)
    (run / "summary.json").write_text(json.dumps({"accuracy_before": None, "accuracy_after": None, "steps": 2,
                                                  "eval_before": {"eval/graded": 0}, "eval_after": {}}))
    with pytest.raises(ReportError, match="neither held-out accuracy nor held-out reverse KL"):
        load_run(run)


def edit_configs(root, **changes):
    """Set dotted keys (``loss__normalization=...``: ``loss.normalization``) in every run's config.json;
    a callable value gets the run directory."""
    for run in root.glob("*/seed*"):
        config = json.loads((run / "config.json").read_text())
        for key, value in changes.items():
            *parents, last = key.split("__")
            node = config
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value(run) if callable(value) else value
        (run / "config.json").write_text(json.dumps(config))


def setup_lines(root):
    """The setup bullets of the page written from the runs under ``root``."""
    records = collect_runs(root)
    return setup_text(records, shown_metrics(summarize(records)))


def test_the_setup_states_the_loss_normalisation_the_runs_used(sweep):
    assert setup_lines(sweep)[0].endswith("loss `rkl`.")  # not recorded: nothing is claimed
    edit_configs(sweep, loss__normalization="kept")
    assert setup_lines(sweep)[0].endswith("loss `rkl` normalised over kept tokens.")
    edit_configs(sweep, loss__normalization="valid")
    assert setup_lines(sweep)[0].endswith("loss `rkl` normalised over all valid response tokens.")


def test_a_setting_that_differs_between_runs_is_shown_with_every_value(sweep):
    edit_configs(sweep, learner__lr=lambda run: 1e-4 if run.parent.name == "all_100" else 3e-4)
    assert "lr 0.0001 or 0.0003 (by run)," in setup_lines(sweep)[0]


def test_the_seed_sentence_names_only_the_seeds_each_run_set(sweep):
    assert "- Seeds [0, 1, 2]." in setup_lines(sweep)  # these configs hold no seeds
    seed = lambda run: int(run.name[4:])  # noqa: E731
    edit_configs(sweep, data__seed=seed, learner__seed=seed, trainer__seed=seed)
    assert ("- Seeds [0, 1, 2]: seed k sets data.seed, learner.seed and trainer.seed to k "
            "(prompt order, learner initialisation).") in setup_lines(sweep)


def test_evaluations_without_eval_every_are_before_and_after_training(sweep):
    edit_configs(sweep, trainer__eval_every=0)
    assert ("- Held-out: greedy accuracy on 10 problems of `test.jsonl`, before training and after the last "
            "step.") in setup_lines(sweep)


def test_the_machine_is_named_only_when_the_sweep_recorded_it(sweep, tmp_path):
    text = write_report(sweep, tmp_path / "a" / "results.md").read_text()
    assert "Wall time: the whole `tip-ray train` process, evaluations and start-up included.\n" in text
    assert "core machine" not in text
    for path in sweep.glob("*/seed*/sweep_run.json"):
        path.write_text(json.dumps({**json.loads(path.read_text()), "machine": {"cpus": 16}}))
    text = write_report(sweep, tmp_path / "b" / "results.md").read_text()
    assert "evaluations and start-up included, on a 16-core machine." in text


def test_the_seed_noise_is_measured_on_the_arms(sweep):
    text = noise_text(summarize(collect_runs(sweep)), METRICS["accuracy"])
    # only all_100 and soft_or_50 have a spread: 2 * sqrt(0.01/3 + 0.005/2) = 0.153
    assert text.endswith("with three seeds, twice that standard error is 15.3 pp here (over the pairs of arms).")


def rock_sweep(tmp_path, vocab_size, params):
    """A one-run rock_freeze sweep with a rock file built from a vocabulary of ``vocab_size``."""
    rocks = save_rock_set(build_rock_set(torch.tensor([1, 2, 2, 3, 3, 3, 4]), torch.ones(7), num_rocks=2,
                                         drop_most_frequent=1,
                                         provenance={"num_rollouts": 4, "distinct_ids_seen": 4,
                                                     "vocab_size": vocab_size}),
                          tmp_path / "rocks.json")
    root = tmp_path / "sweep"
    write_run(root, "rock_freeze", 0, "rock_freeze", None, 0.5)
    edit_configs(root, selection__rock_file=str(rocks), selection__params=params)
    return root


def test_the_rock_bullet_states_the_weight_and_the_papers_sizes_only_where_they_apply(tmp_path):
    (small,) = [line for line in setup_lines(rock_sweep(tmp_path / "a", 128, {})) if "rock_freeze" in line]
    assert "holds 2 rocks (λ = 0: frozen)" in small and "the paper's 100 rocks / 5 dropped would be most" in small
    (large,) = [line for line in setup_lines(rock_sweep(tmp_path / "b", 49152, {"lam": 0.25}))
                if "rock_freeze" in line]
    assert "holds 2 rocks (λ = 0.25: weighted down)" in large and "paper" not in large


def test_a_pair_manifest_is_used_only_for_the_models_it_describes(sweep):
    pair = sweep.parent / "pair"
    (pair / "student").mkdir(parents=True)
    (pair / "teacher").mkdir()
    model = {"num_hidden_layers": 2, "parameters": 1_000_000, "vocab_size": 300, "dtype": "float32"}
    (pair / "manifest.json").write_text(json.dumps({"pair": "tiny", "teacher": {**model, "path": "teacher"},
                                                    "student": {**model, "path": "student"}}))
    edit_configs(sweep, student=str(pair / "student"), teacher__model=str(pair / "teacher"))
    assert any(line.startswith("- Pair `tiny`") and "1.00M parameters" in line for line in setup_lines(sweep))
    edit_configs(sweep, teacher__model=str(sweep.parent / "elsewhere"))
    assert not any(line.startswith("- Pair") for line in setup_lines(sweep))
