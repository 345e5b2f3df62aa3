"""The `tip-ray` command line: one sub-command per job."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from pathlib import Path

import tip_ray

CONF_DIR = Path(__file__).resolve().parent / "conf"
_STACK = ("torch", "transformers", "ray", "deepspeed", "vllm", "hydra", "wandb", "safetensors")


def _env(_: argparse.Namespace) -> int:
    """Print the versions of the stack and the devices torch sees (for bug reports)."""
    print(f"tip_ray      {tip_ray.__version__}")
    print(f"python       {platform.python_version()} ({sys.executable})")
    for name in _STACK:
        try:
            module = importlib.import_module(name)
            version = getattr(module, "__version__", "unknown")
        except Exception as exc:  # a broken optional engine must not hide the rest
            version = f"not importable ({type(exc).__name__}: {exc})"
        print(f"{name:<12} {version}")
    import torch

    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(f"cuda:{i}       {props.name}, {props.total_memory / 2**30:.1f} GiB")
    else:
        print(f"devices      cpu only ({torch.get_num_threads()} threads)")
    return 0


def _prepare_demo(args: argparse.Namespace) -> int:
    """Build (or copy) the embedded teacher, student, tokenizer and task data."""
    from tip_ray.embedded.prepare import prepare_demo

    assets = prepare_demo(args.out, rebuild=args.rebuild)
    print(f"teacher held-out accuracy {assets.teacher_accuracy:.3f}  ({assets.teacher})")
    print(f"student held-out accuracy {assets.student_accuracy:.3f}  ({assets.student})")
    return 0


def _prepare_pair(args: argparse.Namespace) -> int:
    """Build a real pair offline (teacher, pruned student, prompt sets, manifest)."""
    from tip_ray.pairs.prepare import PAIRS, prepare_pair
    from tip_ray.pairs.source import PackageFileMissing

    if args.pair not in PAIRS:
        raise SystemExit(f"tip-ray prepare-pair: unknown pair {args.pair!r}; known pairs: {', '.join(sorted(PAIRS))}")
    out = args.out or f"runs/{args.pair}"
    try:
        assets = prepare_pair(args.pair, out, rebuild=args.rebuild)
    except PackageFileMissing as exc:
        raise SystemExit(f"tip-ray prepare-pair: {exc}") from None
    print(f"teacher {assets.teacher}\nstudent {assets.student}\nprompts {assets.train_data.parent}\n"
          f"manifest {assets.root / 'manifest.json'}")
    print(f"train it: tip-ray train pair={args.pair}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    """Depth-prune a causal LM checkpoint: keep every k-th decoder layer or an explicit list."""
    from tip_ray.pairs.prune import PruneError, parse_layer_list, prune_checkpoint

    try:
        layers = parse_layer_list(args.layers) if args.layers is not None else None
        result = prune_checkpoint(args.src, args.out, keep_every=args.keep_every, layers=layers)
    except PruneError as exc:
        raise SystemExit(f"tip-ray prune: {exc}") from None
    info = result.info
    print(f"kept layers {list(result.kept_layers)} of {result.parent_layers} ({result.layer_path}); "
          f"{info.parameters / 1e6:.1f}M parameters, {info.dtype} -> {info.path}")
    return 0


def compose(config_name: str, overrides: list[str]):
    """Compose ``tip_ray/conf/<config_name>.yaml`` with Hydra overrides into its typed config object.

    A typo, a wrong type or a value out of range is reported before anything heavy starts.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from tip_ray.config import register_configs

    register_configs()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=overrides)
        return OmegaConf.to_object(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        raise SystemExit(f"tip-ray {config_name}: bad configuration: {exc}") from None
    except ValueError as exc:
        raise SystemExit(f"tip-ray {config_name}: {exc}") from None


def _print_job(cfg) -> int:
    """Print a composed, validated config as YAML (``--cfg job``, as Hydra's own flag does)."""
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
    return 0


def _eval(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint on a held-out prompt set (Hydra overrides as arguments)."""
    from tip_ray.data.prompts import DataError
    from tip_ray.eval.run import run_eval
    from tip_ray.state.preflight import CheckpointError

    cfg = compose("eval", args.overrides)
    if args.cfg:
        return _print_job(cfg)
    try:
        run_eval(cfg)
    except (CheckpointError, DataError) as exc:
        raise SystemExit(f"tip-ray eval: {exc}") from None
    return 0


def _train(args: argparse.Namespace) -> int:
    """On-policy distillation with token selection (Hydra overrides as arguments)."""
    cfg = compose("train", args.overrides)
    if args.cfg:
        return _print_job(cfg)
    import ray

    from tip_ray.data.prompts import DataError
    from tip_ray.runtime.placement import ResourceError
    from tip_ray.state.preflight import CheckpointError
    from tip_ray.trainer import Trainer

    try:
        trainer = Trainer(cfg)
    except (CheckpointError, DataError, ResourceError, ValueError) as exc:
        ray.shutdown()
        raise SystemExit(f"tip-ray train: {exc}") from None
    except ray.exceptions.RayError as exc:
        ray.shutdown()
        raise SystemExit(f"tip-ray train: an actor failed while starting: {_describe(exc)}") from None
    try:
        summary = trainer.fit()
    except ray.exceptions.RayError as exc:
        raise SystemExit(f"tip-ray train: {_describe(exc)}\nThe cluster was shut down; the newest checkpoint "
                         f"(if any) is under {trainer.store.root}: the same command resumes from it.") from None
    finally:
        trainer.close()
    _print_summary(summary)
    return 0


def _describe(exc: BaseException) -> str:
    """One paragraph naming the actor method that failed and why (the worker's own error last)."""
    import ray

    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause
        where = exc.function_name or "a worker"
        return (f"{where} raised {type(cause).__name__}: {cause}\n(worker pid {exc.pid}, node {exc.ip}; "
                f"its traceback is in the Ray logs under /tmp/ray/session_latest/logs)")
    return f"{type(exc).__name__}: {exc}"


def _print_summary(summary) -> None:
    from rich.console import Console
    from rich.table import Table

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    table = Table(title="tip_ray run")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("student accuracy before", pct(summary.accuracy_before))
    table.add_row("student accuracy after", pct(summary.accuracy_after))
    table.add_row("teacher accuracy", pct(summary.teacher_accuracy))
    for key, label, fmt in (("eval/graded", "held-out prompts graded", "{:.0f}"),
                            ("eval/rkl", "held-out reverse KL per token", "{:.4f}"),
                            ("eval/teacher_agreement", "held-out greedy agreement with the teacher", "{:.3f}")):
        values = [summary.eval_before.get(key), summary.eval_after.get(key)]
        if any(v is not None for v in values):
            table.add_row(f"{label} (before -> after)",
                          " -> ".join("-" if v is None else fmt.format(v) for v in values))
    if summary.steps_run:
        table.add_row("tokens kept", pct(summary.kept_fraction))
        table.add_row("throughput (response tokens/s)", f"{summary.tokens_per_second:.1f}")
        for phase, seconds in summary.phase_seconds.items():
            table.add_row(f"{phase} s/step", f"{seconds:.2f}")
    else:
        table.add_row("steps trained now", f"none: the run was already complete at step {summary.steps}")
    if summary.skipped_steps:
        table.add_row("steps skipped (NaN/inf)", str(summary.skipped_steps))
    table.add_row("run directory (metrics.jsonl, events.jsonl, config.json, wandb/)", str(summary.run_dir))
    table.add_row("checkpoints (resume: run the same command again)", str(summary.checkpoint_dir))
    if summary.hf_export is not None:
        table.add_row("student, Hugging Face format", str(summary.hf_export))
    Console(width=None if sys.stdout.isatty() else 120).print(table)


def _rocks(args: argparse.Namespace) -> int:
    """Sample student rollouts on the training prompts and write the rock set of ``rock_freeze``."""
    from tip_ray.data.prompts import DataError
    from tip_ray.experiments.rocks import build_rocks, describe
    from tip_ray.state.preflight import CheckpointError, load_tokenizer

    cfg = compose("train", args.overrides)
    try:
        rocks = build_rocks(cfg, args.out, args.rollouts, args.num_rocks, args.drop_most_frequent)
    except (CheckpointError, DataError) as exc:
        raise SystemExit(f"tip-ray rocks: {exc}") from None
    print(describe(rocks, load_tokenizer(cfg.student, "student").decode))
    print(f"wrote {args.out}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    """Run the selection-rule sweep: one ``tip-ray train`` per arm and seed, resumable."""
    from tip_ray.experiments.sweep import arms_by_name, plan, run_sweep, train_command

    try:
        arms = arms_by_name(args.arms.split(",") if args.arms else None)
        runs = plan(arms, args.seeds, args.root, args.overrides, args.rock_file)
    except ValueError as exc:
        raise SystemExit(f"tip-ray sweep: {exc}") from None
    if args.dry_run:
        for run in runs:
            print(("[done] " if run.finished else "") + " ".join(train_command(run)))
        return 0
    outcomes = run_sweep(runs, timeout=args.timeout, grace=args.grace)
    failed = [o.run.run_dir for o in outcomes if o.status == "failed"]
    print(f"sweep: {len(outcomes) - len(failed)} of {len(outcomes)} runs finished" +
          (f"; failed: {', '.join(map(str, failed))}" if failed else ""))
    if any(o.stopped == "signal" for o in outcomes):
        return 130  # stopped by Ctrl-C / SIGTERM, as a shell reports it
    return 1 if failed else 0


def _report(args: argparse.Namespace) -> int:
    """Write the sweep's results page (markdown table and figures)."""
    from tip_ray.experiments.report import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    from tip_ray.experiments.sweep import DEFAULT_GRACE  # standard library only: the parser stays quick

    parser = argparse.ArgumentParser(prog="tip-ray", description=tip_ray.__doc__)
    parser.add_argument("--version", action="version", version=f"tip-ray {tip_ray.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    env = commands.add_parser("env", help="print the versions of the stack and the visible devices")
    env.set_defaults(run=_env)
    prep = commands.add_parser("prepare-demo", help="build the embedded teacher, student, tokenizer and task data")
    prep.add_argument("--out", default="runs/embedded", help="output directory (default: runs/embedded)")
    prep.add_argument("--rebuild", action="store_true",
                      help="train teacher and student from the seed instead of copying the shipped weights")
    prep.set_defaults(run=_prepare_demo)
    pp = commands.add_parser("prepare-pair", help="build a real teacher/student pair offline (e.g. smollm2)")
    pp.add_argument("pair", help="the pair to build: smollm2 (SmolLM2-135M-Instruct and its 10-layer student)")
    pp.add_argument("--out", default=None, help="output directory (default: runs/<pair>)")
    pp.add_argument("--rebuild", action="store_true", help="convert and prune again even when the pair is there")
    pp.set_defaults(run=_prepare_pair)
    pr = commands.add_parser("prune", help="depth-prune a causal LM: keep every k-th layer or a list of layers")
    pr.add_argument("src", help="Hugging Face checkpoint directory to prune")
    pr.add_argument("out", help="output directory (must not exist)")
    keep = pr.add_mutually_exclusive_group(required=True)
    keep.add_argument("--keep-every", type=int, help="keep layers 0, K, 2K, ... (K >= 1)")
    keep.add_argument("--layers", help="comma-separated layer indices to keep, increasing, e.g. 0,3,6")
    pr.set_defaults(run=_prune)
    ev = commands.add_parser("eval", help="evaluate a checkpoint on held-out prompts (Hydra overrides: key=value)")
    ev.add_argument("overrides", nargs="*", help="e.g. model=runs/embedded/teacher data=math500 data.path=...")
    ev.add_argument("--cfg", choices=["job"], help="print the composed, validated config and exit")
    ev.set_defaults(run=_eval)
    tr = commands.add_parser("train", help="on-policy distillation with token selection (Hydra overrides)")
    tr.add_argument("overrides", nargs="*", help="e.g. selection.rule=entropy_topk learner.zero_stage=3")
    tr.add_argument("--cfg", choices=["job"], help="print the composed, validated config and exit (starts nothing)")
    tr.set_defaults(run=_train)
    rk = commands.add_parser("rocks", help="build the rock set of rock_freeze from student rollouts (train overrides)")
    rk.add_argument("--out", default="runs/embedded/rocks.json", help="rock file (default: runs/embedded/rocks.json)")
    rk.add_argument("--rollouts", type=int, default=512, help="student rollouts to sample (default: 512)")
    rk.add_argument("--num-rocks", type=int, default=100, help="rocks to keep (default: 100, the paper's)")
    rk.add_argument("--drop-most-frequent", type=int, default=5,
                    help="most frequent ids left out before ranking (default: 5, the paper's)")
    rk.add_argument("overrides", nargs="*", help="training-config overrides, e.g. student=... rollout.temperature=1.0")
    rk.set_defaults(run=_rocks)
    sw = commands.add_parser(
        "sweep", help="the selection-rule sweep: tip-ray train per arm and seed (resumable)",
        description="One `tip-ray train` per arm and seed, in <root>/<arm>/seed<k>/. Running the same command again "
                    "continues the sweep: a finished run (summary.json at its last step) is skipped; an unfinished "
                    "run whose directory holds a checkpoint resumes from its newest one (checkpoints are written "
                    "every checkpoint.every steps and when a run is stopped cleanly); an unfinished run without one "
                    "starts again, its old directory moved aside to <arm>/stale-seed<k>-<time>.")
    sw.add_argument("--root", default="runs/sweep", help="output root: <root>/<arm>/seed<k>/ (default: runs/sweep)")
    sw.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    sw.add_argument("--arms", default=None, help="comma-separated arm names (default: every arm)")
    sw.add_argument("--rock-file", default="runs/embedded/rocks.json", help="rock file for the rock_freeze arm")
    sw.add_argument("--timeout", type=float, default=None,
                    help="seconds before a run is stopped (default: none): it gets a SIGTERM and --grace seconds to "
                         "finish its step and write its checkpoint (then it is killed); the next sweep resumes it "
                         "from its newest checkpoint")
    sw.add_argument("--grace", type=float, default=DEFAULT_GRACE,
                    help=f"seconds a stopped run (--timeout, Ctrl-C) gets to finish its step and write its checkpoint "
                         f"before it is killed (default: {DEFAULT_GRACE:g})")
    sw.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    sw.add_argument("overrides", nargs="*", help="overrides for every run, e.g. trainer.steps=100 logger.wandb=false")
    sw.set_defaults(run=_sweep)
    rp = commands.add_parser("report", help="write docs/results.md and its figures from a sweep's runs")
    from tip_ray.experiments.report import add_arguments

    add_arguments(rp)
    rp.set_defaults(run=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tip-ray` console script."""
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
