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


def _manifest_model(records: Sequence[RunRecord], role: str) -> dict[str, Any]:
    """The manifest's entry for ``role`` (``student`` or ``teacher``) if it describes the model
    the runs' config names for that role, else {} (a manifest beside the student says nothing
    about a teacher taken from elsewhere)."""
    manifest = _manifest(records)
    entry = manifest.get(role) or {}
    cfg = records[0].config
    used = cfg.get("student") if role == "student" else cfg.get("teacher", {}).get("model")
    if not entry.get("path") or not used:
        return {}
    folder = _model_path(records, cfg["student"]).parent
    return entry if (folder / entry["path"]).resolve() == _model_path(records, used).resolve() else {}


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


def _pair_text(records: Sequence[RunRecord]) -> str | None:
    """The pair's models from the ``prepare-pair`` manifest beside the student (None without a
    pair manifest, or when the runs' teacher or student is not the manifest's)."""
    pair = _manifest(records).get("pair")
    t, s = _manifest_model(records, "teacher"), _manifest_model(records, "student")
    if not pair or not t or not s:
        return None

    def size(model: dict[str, Any]) -> str:
        params = model.get("parameters")
        return f"{model.get('num_hidden_layers')} layers" + (f", {_parameters(params)} parameters" if params else "")

    kept = s.get("kept_layers")
    text = f"- Pair `{pair}` (`tip-ray prepare-pair {pair}`): teacher {size(t)}; student {size(s)}"
    text += f", the teacher's layers {', '.join(map(str, kept))}" if kept else ""
    vocab = s.get("vocab_size")
    return text + (f"; a shared vocabulary of {vocab:,}" if vocab else "") + f"; {s.get('dtype', t.get('dtype'))}."


def rock_file(records: Sequence[RunRecord]) -> str | None:
    """The rock file of the first run that used one (None if none did)."""
    return next((r.config["selection"]["rock_file"] for r in records
                 if r.config.get("selection", {}).get("rock_file")), None)


# What each seed the sweep sets decides (older sweeps also set trainer.seed, which decides nothing).
SEED_MEANINGS = {"data.seed": "prompt order", "rollout.seed": "rollout sampling",
                 "selection.seed": "sampled selection rules", "learner.seed": "learner initialisation",
                 "trainer.seed": None}
# How the loss is averaged, per ``loss.normalization``.
NORMALIZATIONS = {"kept": "normalised over kept tokens", "valid": "normalised over all valid response tokens"}


def _lookup(config: dict[str, Any], key: str) -> Any:
    """The value of a dotted ``key`` in a resolved config (None if absent)."""
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def _setting(records: Sequence[RunRecord], key: str) -> str:
    """A setting of the runs' configs as text: its value when every run has the same one, else
    every value the runs used."""
    values = list(dict.fromkeys(str(_lookup(r.config, key)) for r in records))
    return values[0] if len(values) == 1 else f"{' or '.join(values)} (by run)"


def _training_text(records: Sequence[RunRecord]) -> str:
    """The models, the rollouts and the learner of the runs."""

    def get(key: str) -> str:
        return _setting(records, key)

    norms = {_lookup(r.config, "loss.normalization") for r in records}
    norm = NORMALIZATIONS.get(norms.pop()) if len(norms) == 1 else None
    return (f"- Student `{get('student')}`, teacher `{get('teacher.model')}`; {get('trainer.steps')} steps x "
            f"{get('trainer.prompts_per_step')} prompts x {get('rollout.n')} rollout(s) per run (temperature "
            f"{get('rollout.temperature')}, at most {get('rollout.max_new_tokens')} new tokens), learner: "
            f"{get('learner.world_size')} ranks, ZeRO-{get('learner.zero_stage')}, lr {get('learner.lr')}, "
            f"loss `{get('loss.kind')}`" + (f" {norm}." if norm else "."))


def _held_out_text(records: Sequence[RunRecord], metrics: Sequence[Metric]) -> str:
    """What the held-out evaluation measured, on what, and when."""
    cfg = records[0].config
    limit = "all the" if _lookup(cfg, "eval_data.limit") is None else _setting(records, "eval_data.limit")
    every = _setting(records, "trainer.eval_every")
    when = f"before training, every {every} steps and" if _lookup(cfg, "trainer.eval_every") else "before training and"
    return (f"- Held-out: {_join([m.setup for m in metrics])} on {limit} problems of "
            f"`{_setting(records, 'eval_data.path')}`, {when} after the last step.")


def _seeds_text(records: Sequence[RunRecord]) -> str:
    """The seeds, and which seeded settings each run set to its seed (from its config)."""
    seeds = sorted({r.seed for r in records})
    keys = [k for k in SEED_MEANINGS if all(_lookup(r.config, k) == r.seed for r in records)]
    if not keys:
        return f"- Seeds {seeds}."
    meanings = [SEED_MEANINGS[k] for k in keys if SEED_MEANINGS[k]]
    return (f"- Seeds {seeds}: seed k sets {_join(keys)} to k" + (f" ({', '.join(meanings)})" if meanings else "")
            + ".")


def setup_text(records: Sequence[RunRecord], metrics: Sequence[Metric]) -> list[str]:
    """The setup section's bullets: models and training, the pair, the held-out evaluation on
    ``metrics``, the seeds, the runs, and the rock set if an arm used one."""
    pair = _pair_text(records)
    lines = [
        _training_text(records),
        *([pair] if pair else []),
        _held_out_text(records, metrics),
        _seeds_text(records),
        f"- {len(records)} finished runs in {len({r.arm for r in records})} arms.",
    ]
    rocks = rock_file(records)
    if rocks:
        lines.append(_rock_text(records, rocks, _shown_path(rocks, _sweep_cwd(records))))
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


def wall_time_text(records: Sequence[RunRecord]) -> str:
    """What the wall-time column measures, and on what machine (the CPU count ``tip-ray sweep``
    recorded, when every run recorded the same)."""
    cpus = {r.machine.get("cpus") for r in records}
    where = f", on a {cpus.pop()}-core machine" if len(cpus) == 1 and None not in cpus else ""
    return f"Wall time: the whole `tip-ray train` process, evaluations and start-up included{where}."


def scale_caveat(records: Sequence[RunRecord], summaries: Sequence[ArmSummary]) -> str:
    """How far the sweep's models, task and response lengths are from the papers'."""
    cfg = records[0].config

    def model(role: str, path: Any) -> str:
        params = _manifest_model(records, role).get("parameters")
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


PAPER_ROCKS = (100, 5)  # the paper's rock set: 100 rocks after dropping the 5 most frequent ids


def _rock_text(records: Sequence[RunRecord], rock_file: str, shown: str) -> str:
    """The rock set's bullet: its size and weight, how it was built, and its share of the tokens."""
    from tip_ray.tip.rocks import RockFileError, load_rock_set
    from tip_ray.tip.select import get_rule

    try:
        rocks = load_rock_set(rock_file)
    except RockFileError as exc:
        return f"- rock_freeze: {exc}"
    p = rocks.provenance
    user = next(r for r in records if r.config.get("selection", {}).get("rock_file") == rock_file)
    lam = {**get_rule("rock_freeze").defaults, **user.config["selection"].get("params", {})}["lam"]
    weight = "λ = 0: frozen" if lam == 0 else f"λ = {lam:g}: weighted down"
    vocab = p.get("vocab_size")
    small = vocab and sum(PAPER_ROCKS) > vocab / 2
    return (f"- rock_freeze: `{shown}` holds {len(rocks.token_ids)} rocks ({weight}), built by "
            f"`tip-ray rocks` from {p.get('num_rollouts')} student rollouts ({rocks.num_tokens} tokens, "
            f"{p.get('distinct_ids_seen')} distinct ids of the vocabulary of {vocab}) after dropping the "
            f"{len(rocks.dropped_ids)} most frequent ids"
            + ("; the paper's {} rocks / {} dropped would be most of this vocabulary".format(*PAPER_ROCKS) if small
               else "")
            + f". The rocks are {100 * sum(rocks.frequency):.1f}% of the sampled tokens.")


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
