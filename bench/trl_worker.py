"""The TRL side of bench/trl_comparison.py: on-policy distillation with TRL's DistillationTrainer.

Runs inside bench/.venv-trl (made by bench/setup_trl_env.sh), never in the project's .venv, and
imports nothing from tip_ray. The driver hands it the exact prompt sequence tip_ray's
``PromptStream`` visits (text and token ids); this script checks that the tokenizer maps each
text back to the same ids, then trains the student for ``--steps`` optimizer steps on
``--batch`` prompts per step (fully on-policy: every step samples fresh completions from the
current student with ``transformers`` ``generate``), reverse KL (``beta=1.0`` in TRL's
generalized JSD) against the teacher's full distribution, and times every step by phase:

- ``rollout``: ``DistillationTrainer._generate`` (tokenize + ``generate`` + bookkeeping),
- ``teacher``: the teacher backbone forward (``_get_last_hidden_state`` on the teacher),
- ``learner``: the rest of the optimizer step (student forward, chunked divergence, backward,
  optimizer step).

Writes one JSON document (``--out``) with the per-step records (each with the process's peak RSS
so far, ``peak_rss_mb``: a running maximum) and the process's peak RSS at the end.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far, MiB (Linux reports ``ru_maxrss`` in KiB): student,
    teacher, optimizer states and generation together, as TRL holds them all in one process."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_prompts(path: Path, tokenizer) -> list[str]:
    """The prompt texts of ``path`` (JSONL of {"text", "ids"}), each checked to tokenize to its ids."""
    texts = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        ids = tokenizer(row["text"])["input_ids"]
        if ids != row["ids"]:
            raise SystemExit(f"prompt {row['text']!r} tokenizes to {ids}, not to the ids tip_ray uses {row['ids']}")
        texts.append(row["text"])
    return texts


def build_trainer(args: argparse.Namespace, texts: list[str], output_dir: str):
    """A ``DistillationTrainer`` subclass instance that records per-step phase times."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    records: list[dict] = []
    current: dict = {}

    class TimedDistillationTrainer(DistillationTrainer):
        """Adds timers around generation and the teacher forward; the algorithm is TRL's own."""

        def _generate(self, prompts):
            start = time.perf_counter()
            out = super()._generate(prompts)
            current["rollout"] = current.get("rollout", 0.0) + time.perf_counter() - start
            current["response_tokens"] = current.get("response_tokens", 0) + sum(len(c) for c in out[1])
            current["truncated"] = current.get("truncated", 0) + sum(
                1 for c in out[1] if c and c[-1] not in self.eos_token_ids)
            current["sequences"] = current.get("sequences", 0) + len(out[1])
            return out

        def _get_last_hidden_state(self, unwrapped_model, *a, **kw):
            if unwrapped_model is not self.accelerator.unwrap_model(self.teacher_model):
                return super()._get_last_hidden_state(unwrapped_model, *a, **kw)
            start = time.perf_counter()
            out = super()._get_last_hidden_state(unwrapped_model, *a, **kw)
            current["teacher"] = current.get("teacher", 0.0) + time.perf_counter() - start
            return out

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step (generation happens inside the step's first micro-batch)."""

        def on_step_begin(self, args, state, control, **kwargs):
            current.clear()
            current["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            total = time.perf_counter() - current.pop("start")
            rollout, teacher = current.get("rollout", 0.0), current.get("teacher", 0.0)
            records.append({
                "step": state.global_step, "seconds": total, "time/rollout": rollout, "time/teacher": teacher,
                "time/learner": total - rollout - teacher, "response_tokens": current.get("response_tokens", 0),
                "sequences": current.get("sequences", 0), "truncated": current.get("truncated", 0),
                "peak_rss_mb": _peak_rss_mb(),
            })

    tokenizer = AutoTokenizer.from_pretrained(args.student, padding_side="left")
    config = DistillationConfig(
        output_dir=output_dir,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.batch // args.micro_batch,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=1.0,
        beta=1.0,  # TRL's generalized JSD: 0 = forward KL, 1 = reverse KL (the tip_ray default loss)
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_completion_length=args.max_new_tokens,
        use_vllm=False,
        gradient_checkpointing=False,  # tip_ray does not checkpoint either
        bf16=False,
        fp16=False,
        use_cpu=True,
        model_init_kwargs={"dtype": "float32"},
        teacher_model_init_kwargs={"dtype": "float32"},
        shuffle_dataset=False,  # the driver already wrote the prompts in tip_ray's order
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=args.seed,
    )
    trainer = TimedDistillationTrainer(
        model=args.student,
        teacher_model=args.teacher,
        args=config,
        train_dataset=Dataset.from_list([{"prompt": t} for t in texts]),
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    trainer.bench_records = records
    trainer.bench_threads = torch.get_num_threads()
    return trainer


def main() -> int:
    """Parse the arguments, train, write the JSON document."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--prompts", type=Path, required=True, help="JSONL of {text, ids}, in visiting order")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True, help="prompts (= sequences) per optimizer step")
    parser.add_argument("--micro-batch", type=int, required=True)
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.batch % args.micro_batch:
        raise SystemExit(f"--batch {args.batch} must be a multiple of --micro-batch {args.micro_batch}")

    import torch
    import trl
    from transformers import AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    texts = load_prompts(args.prompts, AutoTokenizer.from_pretrained(args.student))
    if len(texts) < args.steps * args.batch:
        raise SystemExit(f"{len(texts)} prompts for {args.steps} steps of {args.batch}")
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as output_dir:
        trainer = build_trainer(args, texts[: args.steps * args.batch], output_dir)
        ready = time.perf_counter()
        trainer.train()
        finished = time.perf_counter()
    doc = {
        "trl_version": trl.__version__,
        "torch_threads": trainer.bench_threads,
        "startup_seconds": ready - started,
        "train_seconds": finished - ready,
        "peak_rss_mb": _peak_rss_mb(),
        "steps": trainer.bench_records,
    }
    args.out.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
