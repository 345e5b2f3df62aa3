"""Held-out evaluation through the pools: greedy samples from the rollout pool, the teacher pool's
signal, the learner's per-token reverse KL (2 ZeRO-3 ranks, one of them with an idle
micro-batch), accuracy over the graded rows only; checked against transformers forward passes
of the student and the teacher on the same samples.

The teacher sends its full distribution (the embedded pair's 128 ids), so the learner's reverse
KL is the exact one and the reference needs no estimator: a float32 top-K signal's tail bucket
(1 - the sent mass, tiny for a confident teacher) carries rounding that the estimator's own
tests cover, not this one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tip_ray.data.tasks import make_splits, write_jsonl

pytestmark = pytest.mark.slow
ASSETS = Path(__file__).resolve().parents[2] / "tip_ray" / "embedded" / "assets"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-divergence-data")
    train, test = make_splits(0, 16, 5)
    write_jsonl(train, root / "train.jsonl")
    write_jsonl(test, root / "test.jsonl")
    rows = [json.loads(line) for line in (root / "test.jsonl").read_text().splitlines()]
    for index in (1, 3):  # open prompts: nothing to grade
        rows[index]["answer"] = None
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def reference(model_dir: str, teacher_dir: str, result, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per response token of ``result``'s samples, from full transformers forward passes: the
    exact KL(P_S || P_T), float64 [m], and whether the teacher's argmax is the sampled token, bool [m]."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    exact, agree = [], []
    for g in result.generations:
        prompt = prompts[g.prompt_index]
        ids = torch.tensor([prompt + list(g.token_ids)])
        with torch.no_grad():
            s = torch.log_softmax(student(ids).logits[0].double(), -1)
            t = torch.log_softmax(teacher(ids).logits[0].double(), -1)
        for i, token in enumerate(g.token_ids):
            pos = len(prompt) - 1 + i
            ls, lt = s[pos], t[pos]
            exact.append(float((ls.exp() * (ls - lt)).sum()))
            agree.append(int(lt.argmax()) == token)
    return torch.tensor(exact, dtype=torch.float64), torch.tensor(agree)


def test_held_out_divergence_equals_forward_passes_of_student_and_teacher(tmp_path, data):
    from tip_ray.cli import compose
    from tip_ray.trainer import Trainer

    run_dir = tmp_path / "run"
    cfg = compose("train", [
        f"student={ASSETS / 'student'}", f"teacher.model={ASSETS / 'teacher'}", "teacher.top_k=null",
        f"data.path={data / 'train.jsonl'}", f"eval_data.path={data / 'test.jsonl'}", "eval_data.null_answer=ungraded",
        "trainer.steps=1", "trainer.prompts_per_step=4", "trainer.eval_max_new_tokens=24", "rollout.engine=hf",
        "rollout.max_new_tokens=24", "learner.world_size=2", "learner.zero_stage=3", "learner.global_batch_size=4",
        "learner.micro_batch_size=2", "learner.dtype=fp32", "logger.wandb=false", f"trainer.output_dir={run_dir}"])
    trainer = Trainer(cfg)
    try:
        prompts = [trainer.eval_data[i].prompt_ids for i in range(len(trainer.eval_data))]
        summary = trainer.fit()
        # After one step and its sync: the learner's current weights, as exported, are the student.
        final = trainer.held_out()
        plain = trainer.held_out(divergence=False)
    finally:
        trainer.close()

    metrics = final.metrics()
    assert metrics["eval/graded"] == 3 and final.graded == 3
    assert [c is None for c in final.correct] == [False, True, False, True, False]
    assert metrics.get("eval/accuracy") == final.accuracy and (final.accuracy is None or 0 <= final.accuracy <= 1)
    assert math.isfinite(metrics["eval/rkl"]) and metrics["eval/rkl"] >= 0
    assert 0.0 <= metrics["eval/teacher_agreement"] <= 1.0

    exact, agree = reference(str(summary.hf_export), str(ASSETS / "teacher"), final, prompts)
    assert final.rkl.shape == exact.shape == (sum(len(g.token_ids) for g in final.generations),)
    torch.testing.assert_close(final.rkl, exact, atol=1e-5, rtol=1e-4)
    assert math.isclose(metrics["eval/rkl"], float(exact.mean()), rel_tol=1e-5)
    assert torch.equal(final.agreement, agree)
    assert math.isclose(metrics["eval/teacher_agreement"], float(agree.double().mean()))
    assert summary.eval_after == pytest.approx(metrics)  # greedy samples and the weights are the same twice

    # Without the divergence: the same samples and grades, no teacher or learner call.
    assert plain.generations == final.generations and plain.correct == final.correct
    assert plain.rkl is None and plain.agreement is None
    assert not {"eval/rkl", "eval/teacher_agreement"} & set(plain.metrics())

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in (rows[0], rows[-1]):
        assert row["eval/graded"] == 3 and 0 <= row["eval/teacher_agreement"] <= 1 and row["eval/rkl"] >= 0
    assert rows[0]["step"] == 0 and rows[-1]["step"] == 1
    assert summary.eval_before["eval/rkl"] == rows[0]["eval/rkl"]
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["eval_after"]["eval/graded"] == 3 and "eval/rkl" in saved["eval_before"]
