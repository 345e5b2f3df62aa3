"""Build the embedded default: tokenizer, task data, teacher and student checkpoints.

``prepare_demo(out_dir)`` writes::

    out_dir/tokenizer/        the character tokenizer (save_pretrained)
    out_dir/data/train.jsonl  training prompts (id, prompt, answer, family)
    out_dir/data/test.jsonl   held-out prompts, disjoint from train
    out_dir/teacher/          Qwen3 causal LM, safetensors, tokenizer files beside it
    out_dir/student/          the weaker, SFT-warm-started student, same format
    out_dir/manifest.json     seeds, shapes, SFT histories and held-out accuracies

The checkpoints the project ships (``tip_ray/embedded/assets``) were made by this function with
``rebuild=True``; without it the shipped weights are copied (seconds), with it they are trained
again from the seed (tens of minutes on two CPU cores).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tip_ray.data.tasks import TaskSpec, make_splits, write_jsonl
from tip_ray.embedded.models import STUDENT_SHAPE, TEACHER_SHAPE, ModelShape, build_model
from tip_ray.embedded.sft import SFTPlan, train_sft

ASSETS = Path(__file__).resolve().parent / "assets"
SEED = 0
NUM_TRAIN = 20_000
NUM_TEST = 500
SPEC = TaskSpec()
TEACHER_PLAN = SFTPlan(max_steps=4000, batch_size=64, lr=2e-3, eval_every=200, stop_at_accuracy=0.97)
STUDENT_PLAN = SFTPlan(max_steps=3000, batch_size=64, lr=2e-3, eval_every=50, stop_at_accuracy=0.2,
                       max_accuracy=0.45)
EVAL_DURING_SFT = 200  # held-out problems scored at each SFT evaluation
MAX_NEW_TOKENS = 96


@dataclass(frozen=True)
class DemoAssets:
    """Where the built pieces are, and the held-out accuracies measured on all test prompts."""

    root: Path
    tokenizer: Path
    teacher: Path
    student: Path
    train_data: Path
    test_data: Path
    teacher_accuracy: float
    student_accuracy: float


def greedy_accuracy(model, tokenizer, problems) -> float:
    """Fraction of ``problems`` solved by greedy decoding, graded on the answer line."""
    from tip_ray.data.grading import grade_exact
    from tip_ray.rollout.hf import HFGenerator
    from tip_ray.types import SamplingSettings

    prompts = [
        tokenizer(
            tokenizer.apply_chat_template([{"role": "user", "content": p.prompt}], tokenize=False,
                                          add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
        for p in problems
    ]
    outputs = HFGenerator(model, tokenizer).generate(prompts, SamplingSettings(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0))
    texts = [tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outputs]
    return sum(grade_exact(t, p.answer) for t, p in zip(texts, problems)) / len(problems)


def _train(name: str, shape: ModelShape, plan: SFTPlan, seed: int, tokenizer, train, test, log) -> tuple[object, dict]:
    model = build_model(shape, tokenizer, seed)
    probe = test[:EVAL_DURING_SFT]
    start = time.perf_counter()
    result = train_sft(
        model, tokenizer, SPEC, plan, seed, exclude={p.uid for p in test},
        evaluate=lambda m: greedy_accuracy(m, tokenizer, probe), log=lambda s: log(f"[{name}] {s}"),
    )
    info = {"shape": asdict(shape), "plan": asdict(plan), "seed": seed, "steps": result.steps,
            "history": result.history, "seconds": round(time.perf_counter() - start, 1),
            "parameters": sum(p.numel() for p in model.parameters())}
    return model, info


def prepare_demo(out_dir: str | Path, rebuild: bool = False, log=print) -> DemoAssets:
    """Write the embedded default into ``out_dir`` (see the module docstring); idempotent."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tip_ray.data.tokenizer import save_char_tokenizer

    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    save_char_tokenizer(root / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    train, test = make_splits(SEED, NUM_TRAIN, NUM_TEST, SPEC)
    write_jsonl(train, root / "data" / "train.jsonl")
    write_jsonl(test, root / "data" / "test.jsonl")

    manifest: dict = {"seed": SEED, "task": asdict(SPEC), "num_train": NUM_TRAIN, "num_test": NUM_TEST}
    for name, shape, plan, seed in (("teacher", TEACHER_SHAPE, TEACHER_PLAN, SEED + 1),
                                    ("student", STUDENT_SHAPE, STUDENT_PLAN, SEED + 2)):
        target = root / name
        if rebuild:
            model, manifest[name] = _train(name, shape, plan, seed, tokenizer, train, test, log)
            _save_atomically(model, tokenizer, target)
        else:
            if not (ASSETS / name / "config.json").exists():
                raise FileNotFoundError(
                    f"shipped {name} checkpoint missing under {ASSETS}; run `tip-ray prepare-demo --rebuild`"
                )
            _copy_atomically(ASSETS / name, target)
            manifest[name] = json.loads((ASSETS / "manifest.json").read_text()).get(name, {})

    accuracies = {}
    for name in ("teacher", "student"):
        model = AutoModelForCausalLM.from_pretrained(str(root / name))
        accuracies[name] = greedy_accuracy(model, tokenizer, test)
        manifest[name]["heldout_accuracy"] = accuracies[name]
        log(f"{name}: held-out greedy accuracy {accuracies[name]:.3f} on {len(test)} prompts")
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return DemoAssets(root, root / "tokenizer", root / "teacher", root / "student", root / "data" / "train.jsonl",
                      root / "data" / "test.jsonl", accuracies["teacher"], accuracies["student"])


def _save_atomically(model, tokenizer, target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _copy_atomically(source: Path, target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
