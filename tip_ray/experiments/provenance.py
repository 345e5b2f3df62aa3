"""What a sweep's runs were, from their configs, commands and the files beside their models: the
pair and its models, the setup, what the memory column measures, how far the sweep is from the
papers' scale, and the commands that rebuild it."""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tip_ray.experiments.scores import ArmSummary, Metric, RunRecord, arm_order
from tip_ray.experiments.sweep import DEFAULT_ARMS, is_per_run


def _join(parts: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _model_path(records: Sequence[RunRecord], path: str) -> Path:
    """A model path of the config, relative paths taken from the sweep's directory (else here)."""
    return Path(path) if Path(path).is_absolute() else (_sweep_cwd(records) or Path.cwd()) / path


def _student_json(records: Sequence[RunRecord], name: str, beside: bool = False) -> dict[str, Any]:
    """The JSON file ``name`` inside the student's checkpoint directory, or ``beside`` it (in its
    parent); {} if there is none or it is unreadable."""
    student = records[0].config.get("student")
    if not student:
        return {}
    folder = _model_path(records, student)
    try:
        return json.loads(((folder.parent if beside else folder) / name).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _manifest(records: Sequence[RunRecord]) -> dict[str, Any]:
    """The ``manifest.json`` that ``prepare-demo``/``prepare-pair`` wrote beside the student ({} if none)."""
    return _student_json(records, "manifest.json", beside=True)


def pair_name(records: Sequence[RunRecord]) -> str | None:
    """``embedded`` for the embedded default student, else the sweep's ``pair=`` override, else the
    manifest's pair (None if none of these)."""
    if records[0].config.get("student") == "runs/embedded/student":
        return "embedded"
    run = next((r for r in records if r.command), None)
    pair = next((o.split("=", 1)[1] for o in run.command[4:] if o.startswith("pair=")), None) if run else None
    return pair or _manifest(records).get("pair")


def title(records: Sequence[RunRecord]) -> str:
    """What the page's title calls the sweep: the embedded default, a pair, or the student's path."""
    pair = pair_name(records)
    if pair == "embedded":
        return "the embedded default"
    return f"the {pair} pair" if pair else f"`{records[0].config.get('student')}`"


def _parameters(n: int) -> str:
    """``0.43M`` below ten million, ``135M`` above."""
    millions = n / 1e6
    return f"{millions:.2f}M" if millions < 10 else f"{millions:.0f}M"


def _pair_text(manifest: dict[str, Any]) -> str | None:
    """The pair's models from a ``prepare-pair`` manifest (None for another manifest)."""
    if not manifest.get("pair"):
        return None
    t, s = manifest.get("teacher", {}), manifest.get("student", {})

    def size(model: dict[str, Any]) -> str:
        params = model.get("parameters")
        return f"{model.get('num_hidden_layers')} layers" + (f", {_parameters(params)} parameters" if params else "")

    kept = s.get("kept_layers")
    text = f"- Pair `{manifest['pair']}` (`tip-ray prepare-pair {manifest['pair']}`): teacher {size(t)}; student {size(s)}"
    text += f", the teacher's layers {', '.join(map(str, kept))}" if kept else ""
    vocab = s.get("vocab_size")
    return text + (f"; a shared vocabulary of {vocab:,}" if vocab else "") + f"; {s.get('dtype', t.get('dtype'))}."


def rock_file(records: Sequence[RunRecord]) -> str | None:
    """The rock file of the first run that used one (None if none did)."""
    return next((r.config["selection"]["rock_file"] for r in records
                 if r.config.get("selection", {}).get("rock_file")), None)


def setup_text(records: Sequence[RunRecord], metrics: Sequence[Metric]) -> list[str]:
    """The setup section's bullets: models and training, the pair, the held-out evaluation on
    ``metrics``, the seeds, the runs, and the rock set if an arm used one."""
    cfg = records[0].config
    trainer, rollout, learner = cfg.get("trainer", {}), cfg.get("rollout", {}), cfg.get("learner", {})
    eval_data = cfg.get("eval_data", {})
    limit = eval_data.get("limit")
    seeds = sorted({r.seed for r in records})
    pair = _pair_text(_manifest(records))
    lines = [
        f"- Student `{cfg.get('student')}`, teacher `{cfg.get('teacher', {}).get('model')}`; "
        f"{trainer.get('steps')} steps x {trainer.get('prompts_per_step')} prompts x {rollout.get('n')} rollout(s) "
        f"per run (temperature {rollout.get('temperature')}, at most {rollout.get('max_new_tokens')} new tokens), "
        f"learner: {learner.get('world_size')} ranks, ZeRO-{learner.get('zero_stage')}, lr {learner.get('lr')}, "
        f"loss `{cfg.get('loss', {}).get('kind')}` normalised over kept tokens.",
        *([pair] if pair else []),
        f"- Held-out: {_join([m.setup for m in metrics])} on {'all the' if limit is None else limit} problems of "
        f"`{eval_data.get('path')}`, before training, every {trainer.get('eval_every')} steps and "
        "after the last step.",
        f"- Seeds {seeds}: seed k sets data.seed, rollout.seed, selection.seed, learner.seed and trainer.seed to k "
        "(prompt order, rollout sampling, sampled selection rules, learner initialisation).",
        f"- {len(records)} finished runs in {len({r.arm for r in records})} arms.",
    ]
    rocks = rock_file(records)
    if rocks:
        lines.append(_rock_text(rocks, _shown_path(rocks, _sweep_cwd(records))))
    return lines


NEGLIGIBLE = 0.01  # logits under this share of the learner's peak are called negligible


def memory_text(records: Sequence[RunRecord], summaries: Sequence[ArmSummary]) -> str:
    """What the peak-memory column measures, and how big the logits are next to it (from the
    student's vocabulary, the learner's micro-batch and the longest sequence)."""
    cfg = records[0].config
    on_gpu = bool(cfg.get("cluster", {}).get("learner", {}).get("gpus"))
    text = ("Peak learner memory is the peak CUDA memory allocated on a learner rank" if on_gpu
            else "Peak learner memory on CPU is the learner process's peak resident set")
    vocab = _student_json(records, "config.json").get("vocab_size")
    rows = cfg.get("learner", {}).get("micro_batch_size")
    length = (cfg.get("data", {}).get("max_prompt_tokens") or 0) + (cfg.get("rollout", {}).get("max_new_tokens") or 0)
    if not vocab or not rows or not length:
        return text + "."
    logits_mb = rows * length * vocab * 4 / 2**20
    if logits_mb < NEGLIGIBLE * min(s.peak_memory_mb for s in summaries):
        return text + (f" (the vocabulary here is {vocab:,}, so the logits that selection saves are a negligible part "
                       "of it; the saving shows on GPUs with large vocabularies, see `make bench`).")
    return text + (f" (the vocabulary here is {vocab:,}: the fp32 logits of one micro-batch of {rows} x {length} "
                   f"tokens take {logits_mb:.0f} MB; see `make bench` for how selection changes the peak).")


def scale_caveat(records: Sequence[RunRecord], summaries: Sequence[ArmSummary]) -> str:
    """How far the sweep's models, task and response lengths are from the papers'."""
    cfg, manifest = records[0].config, _manifest(records)

    def model(role: str, path: Any) -> str:
        params = manifest.get(role, {}).get("parameters")
        return f"a {_parameters(params)}-parameter {role}" if params else f"the {role} `{path}`"

    task = ("column arithmetic" if pair_name(records) == "embedded"
            else f"to answer the prompts of `{cfg.get('data', {}).get('path')}`")
    base = next((s for s in summaries if s.rule == "all"), summaries[0])
    length = base.end_state.get("response_length")
    about = "" if length is None else f" with about {max(10, round(length, -1)):.0f}-token responses"
    return ("Scale caveat: the papers distil Qwen3 8B/4B -> 4B/1.7B on competition math with thousands of response "
            f"tokens; here {model('student', cfg.get('student'))} learns {task} from "
            f"{model('teacher', cfg.get('teacher', {}).get('model'))}{about}, so agreement is in kind, not in size.")


def _sweep_cwd(records: Sequence[RunRecord]) -> Path | None:
    """The directory the sweep ran in, from a run's relative ``trainer.output_dir`` (None if unknown)."""
    run = next((r for r in records if r.command), None)
    if run is None:
        return None
    out_dir = next((o.split("=", 1)[1] for o in run.command if o.startswith("trainer.output_dir=")), None)
    if out_dir is None or Path(out_dir).is_absolute():
        return None
    return run.run_dir.resolve().parents[len(Path(out_dir).parts) - 1]


def _shown_path(path: str, cwd: Path | None) -> str:
    """``path`` relative to the sweep's directory when it lies inside it."""
    if cwd is not None and Path(path).is_absolute() and Path(path).is_relative_to(cwd):
        return str(Path(path).relative_to(cwd))
    return path


def _rock_text(rock_file: str, shown: str) -> str:
    from tip_ray.tip.rocks import RockFileError, load_rock_set

    try:
        rocks = load_rock_set(rock_file)
    except RockFileError as exc:
        return f"- rock_freeze: {exc}"
    p = rocks.provenance
    return (f"- rock_freeze: `{shown}` holds {len(rocks.token_ids)} rocks (λ = 0: frozen), built by "
            f"`tip-ray rocks` from {p.get('num_rollouts')} student rollouts ({rocks.num_tokens} tokens, "
            f"{p.get('distinct_ids_seen')} distinct ids of the vocabulary of {p.get('vocab_size')}) after dropping the "
            f"{len(rocks.dropped_ids)} most frequent ids; the paper's 100 rocks / 5 dropped would be most of this "
            f"vocabulary. The rocks are {100 * sum(rocks.frequency):.1f}% of the sampled tokens.")


def _prepare_command(records: Sequence[RunRecord]) -> str | None:
    """The command that builds the sweep's models: ``prepare-demo`` or ``prepare-pair <pair>``."""
    from tip_ray.pairs.prepare import PAIRS

    pair = pair_name(records)
    if pair == "embedded":
        return "tip-ray prepare-demo"
    return f"tip-ray prepare-pair {pair}" if pair in PAIRS else None


def _rocks_command(path: str, shown: str) -> str | None:
    """The ``tip-ray rocks`` command that built the rock file ``path`` (written as ``shown``),
    from its parameters and provenance; None if the file cannot be read."""
    from tip_ray.tip.rocks import RockFileError, load_rock_set

    try:
        rocks = load_rock_set(path)
    except RockFileError:
        return None
    return shlex.join(["tip-ray", "rocks", "--out", shown, "--rollouts", str(rocks.provenance.get("num_rollouts")),
                       "--num-rocks", str(rocks.params.get("num_rocks")), "--drop-most-frequent",
                       str(rocks.params.get("drop_most_frequent"))])


def reproduce_commands(records: Sequence[RunRecord], notes: str | None = None, out: str = "docs/results.md",
                       metric: str | None = None) -> list[str]:
    """The commands that rebuild the sweep from a checkout, as they were run (paths relative to
    the directory the sweep ran in): the models, the rock set if an arm used one, the sweep with
    its shared overrides, seeds and arms, and this report into ``out`` (with its ``notes`` file
    and ``--metric``, if any). Empty if no run records its command."""
    run = next((r for r in records if r.command), None)
    if run is None:
        return []
    overrides = list(run.command[4:])  # after: python -m tip_ray.cli train
    out_dir = Path(next((o.split("=", 1)[1] for o in overrides if o.startswith("trainer.output_dir=")), "."))
    root = out_dir.parent.parent
    prepare = _prepare_command(records)
    lines = [prepare] if prepare else []
    rocks_path = rock_file(records)
    sweep = ["tip-ray", "sweep", "--root", str(root), "--seeds", *map(str, sorted({r.seed for r in records}))]
    arms = sorted({r.arm for r in records}, key=arm_order)
    if set(arms) != {a.name for a in DEFAULT_ARMS}:
        sweep += ["--arms", ",".join(arms)]
    if rocks_path:
        shown = _shown_path(rocks_path, _sweep_cwd(records))
        lines += [c for c in [_rocks_command(rocks_path, shown)] if c]
        sweep += ["--rock-file", shown]
    lines.append(shlex.join(sweep + [o for o in overrides if not is_per_run(o)]))
    report = ["tip-ray", "report", "--root", str(root), "--out", out]
    lines.append(shlex.join(report + (["--notes", notes] if notes else []) + (["--metric", metric] if metric else [])))
    return lines
