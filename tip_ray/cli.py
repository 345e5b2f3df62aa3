"""The `tip-ray` command line: one sub-command per job."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from pathlib import Path

import tip_ray

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
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


def compose(config_name: str, overrides: list[str]):
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides into its typed config object.

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


def _eval(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint on a held-out prompt set (Hydra overrides as arguments)."""
    from tip_ray.checkpoints import CheckpointError
    from tip_ray.data.prompts import DataError
    from tip_ray.eval.run import run_eval

    cfg = compose("eval", args.overrides)
    try:
        run_eval(cfg)
    except (CheckpointError, DataError) as exc:
        raise SystemExit(f"tip-ray eval: {exc}") from None
    return 0


def _train(args: argparse.Namespace) -> int:
    """On-policy distillation with token selection (Hydra overrides as arguments)."""
    from tip_ray.checkpoints import CheckpointError
    from tip_ray.data.prompts import DataError
    from tip_ray.groups import ResourceError
    from tip_ray.trainer import Trainer

    cfg = compose("train", args.overrides)
    try:
        trainer = Trainer(cfg)
    except (CheckpointError, DataError, ResourceError) as exc:
        import ray

        ray.shutdown()
        raise SystemExit(f"tip-ray train: {exc}") from None
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    _print_summary(summary)
    return 0


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
    table.add_row("tokens kept", pct(summary.kept_fraction))
    table.add_row("throughput (response tokens/s)", f"{summary.tokens_per_second:.1f}")
    for phase, seconds in summary.phase_seconds.items():
        table.add_row(f"{phase} s/step", f"{seconds:.2f}")
    table.add_row("run directory (metrics.jsonl, config.json, wandb/)", str(summary.run_dir))
    Console(width=None if sys.stdout.isatty() else 120).print(table)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
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
    ev = commands.add_parser("eval", help="evaluate a checkpoint on held-out prompts (Hydra overrides: key=value)")
    ev.add_argument("overrides", nargs="*", help="e.g. model=runs/embedded/teacher data=math500 data.path=...")
    ev.set_defaults(run=_eval)
    tr = commands.add_parser("train", help="on-policy distillation with token selection (Hydra overrides)")
    tr.add_argument("overrides", nargs="*", help="e.g. selection.rule=entropy_topk learner.zero_stage=3")
    tr.set_defaults(run=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tip-ray` console script."""
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
