"""LoRA students (``learner.lora``): the config's checks, the target-module check against a real
student, and one real LearnerWorker rank (DeepSpeed on gloo, in a spawned process: DeepSpeed keeps
process-wide state) under ZeRO-2, and under ZeRO-3 with gradient checkpointing (a frozen, partitioned base recomputed
in the backward), that trains the adapters, serves the merged weights under the base model's
names, saves and restores only the adapters, and exports them."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tip_ray.config import LearnerConfig, LoraConfig, LossConfig, SelectionConfig
from tip_ray.learner.lora import check_target_modules
from tip_ray.tip import TeacherSignal
from tip_ray.types import TrainBatch

R, ALPHA = 4, 8.0
BATCH = 4



@pytest.mark.parametrize(("settings", "message"), [
    ({"r": 0}, r"learner.lora.r must be an integer >= 1"),
    ({"alpha": 0.0}, r"learner.lora.alpha must be > 0"),
    ({"dropout": 1.0}, r"learner.lora.dropout must be in \[0, 1\)"),
    ({"target_modules": []}, r"learner.lora.target_modules must be 'all-linear' or a non-empty list"),
    ({"target_modules": "q_proj"}, r"learner.lora.target_modules must be 'all-linear' or a non-empty list"),
])
def test_lora_settings_out_of_range_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**settings)


def test_lora_combinations_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match=r"learner.lora.dropout=0.1 cannot be used.*selected on one forward"):
        LearnerConfig(model="m", lora=LoraConfig(enabled=True, dropout=0.1))
    LearnerConfig(model="m", lora=LoraConfig(dropout=0.1))  # LoRA off: the LoRA settings are not used


def test_target_modules_must_name_linear_layers_of_the_decoder(tiny_student):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_student)
    check_target_modules(model, LoraConfig(target_modules=["q_proj", "self_attn.v_proj", "mlp.down_proj"]))
    with pytest.raises(ValueError, match=r"learner.lora.target_modules: 'qproj' matches no module.*'q_proj'"):
        check_target_modules(model, LoraConfig(target_modules=["q_proj", "qproj"]))
    for other in ("lm_head", "embed_tokens", "mlp"):
        with pytest.raises(ValueError, match=rf"'{other}' matches .* not linear layers of the decoder"):
            check_target_modules(model, LoraConfig(target_modules=[other]))


def _batch() -> TrainBatch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (BATCH, 16), generator=g)
    mask = torch.zeros(BATCH, 15, dtype=torch.bool)
    mask[:, 4:] = True
    teacher = TeacherSignal.from_logits(torch.randn(BATCH, 15, 128, generator=g) * 2, ids[:, 1:], k=8)
    return TrainBatch(ids, torch.ones_like(ids), mask, teacher)


def _receive(plan, port: int, path: str) -> None:
    """A weight-group member (rank 1 of 2, gloo): what the learner broadcasts, saved at ``path``."""
    from tip_ray.sync.process_group import WeightGroup

    group = WeightGroup(plan, 1, 2, "gloo", timeout_s=60, host="127.0.0.1", port=port)
    torch.save({name: tensor.clone() for name, tensor in group.receive()}, path)
    group.close()


def _lora_rank(rank: int, port: int, model: str, stage: int, checkpointing: bool, out: str) -> None:
    """One learner rank: two steps, then the served weights, a save/step/load/step round trip and
    an export; what it saw goes to ``out/result.pt``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from tip_ray.learner.worker import LearnerWorker

    cfg = LearnerConfig(model=model, zero_stage=stage, lr=1e-2, global_batch_size=BATCH, micro_batch_size=2,
                        gradient_checkpointing=checkpointing,
                        lora=LoraConfig(enabled=True, r=R, alpha=ALPHA, target_modules=["q_proj", "v_proj",
                                                                                        "down_proj"]))
    worker = LearnerWorker(cfg, SelectionConfig(rule="soft_or", ratio=0.5), LossConfig())
    lm = worker.engine.module.lm

    def params() -> dict[str, torch.Tensor]:  # every parameter whole, peft's names
        import deepspeed

        named = dict(lm.named_parameters())
        with deepspeed.zero.GatheredParameters(list(named.values()), enabled=stage == 3):
            return {n: p.detach().clone() for n, p in named.items()}

    result = {"trainable": sorted(n for n, p in lm.named_parameters() if p.requires_grad),
              "training_mode": lm.training, "before": params()}
    batch = _batch()
    for _ in range(2):
        worker.train_step(batch)
    result["after"] = params()
    result["served"] = worker.export_weights()
    result["metadata"] = worker.weight_metadata()
    # The collective sync: the bucketed broadcast a vLLM worker receives, here to a plain member.
    from tip_ray.sync.buckets import plan_buckets

    plan = plan_buckets(result["metadata"], 8192)
    port, backend = worker.host_weight_group("127.0.0.1", "gloo", 60)
    receiver = mp.get_context("spawn").Process(target=_receive, args=(plan, port, f"{out}/received.pt"))
    receiver.start()
    worker.join_weight_group(plan, 2, backend, 60)
    result["buckets"], result["sent"] = len(plan), worker.broadcast_weights()
    receiver.join(120)
    worker.close_weight_group()
    worker.save_state(f"{out}/state")
    worker.train_step(batch)
    result["after_save_step"] = params()
    worker.load_state(f"{out}/state")
    result["loaded"], result["loaded_steps"] = params(), worker.steps
    worker.train_step(batch)
    result["after_load_step"] = params()
    worker.export_hf(f"{out}/hf")
    result["exported_from"] = params()
    torch.save(result, f"{out}/result.pt")
    worker.close()


def _numel(obj) -> int:
    """Elements of every tensor in ``obj`` (nested dicts, lists, tuples)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, dict):
        return sum(_numel(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_numel(v) for v in obj)
    return 0


CASES = {0: False, 2: False, 3: True}  # ZeRO stage: gradient checkpointing


@pytest.fixture(scope="module")
def runs(tiny_student, tmp_path_factory) -> dict[int, tuple[dict, Path]]:
    """Per ZeRO stage of ``CASES``: what the rank saw, and its output directory."""
    out = {}
    for stage, checkpointing in CASES.items():
        directory = tmp_path_factory.mktemp(f"lora-zero{stage}")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_lora_rank, args=(port, tiny_student, stage, checkpointing, str(directory)), nprocs=1,
                           join=True, start_method="spawn")
        out[stage] = torch.load(directory / "result.pt", weights_only=False), directory
    return out


@pytest.mark.slow
def test_zero3_with_checkpointing_trains_the_adapters_as_zero2_does(runs):
    (two, _), (three, _) = runs[2], runs[3]
    for name in two["trainable"]:
        torch.testing.assert_close(three["after"][name], two["after"][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(CASES))
def test_a_lora_student_trains_serves_merged_weights_and_checkpoints_its_adapters(stage, tiny_student, runs):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    result, tmp_path = runs[stage]
    before, after = result["before"], result["after"]
    assert result["trainable"] == sorted(n for n in before if ".lora_A." in n or ".lora_B." in n)
    assert len(result["trainable"]) == 2 * 3 * 2  # A and B of q_proj, v_proj, down_proj in 2 layers
    # Out of training mode (no dropout at all) unless checkpointing puts it in (learner.lora.dropout is refused).
    assert result["training_mode"] == CASES[stage]
    for name in before:  # only the adapters moved
        assert torch.equal(before[name], after[name]) != (name in result["trainable"]), name

    # The served weights: the base model's names, W0 + alpha/r * B @ A where an adapter is.
    base = AutoModelForCausalLM.from_pretrained(tiny_student)
    base_params = dict(base.named_parameters())
    served = result["served"]
    assert list(served) == list(base_params)
    assert [(m.name, tuple(m.shape)) for m in result["metadata"]] == [(n, tuple(p.shape)) for n, p in
                                                                      base_params.items()]
    merged = 0
    for name, w0 in base_params.items():
        owner = name.removesuffix(".weight")
        a = after.get(f"{owner}.lora_A.default.weight")
        expected = w0.detach() if a is None else w0.detach() + ALPHA / R * after[f"{owner}.lora_B.default.weight"] @ a
        merged += a is not None
        torch.testing.assert_close(served[name], expected, rtol=1e-6, atol=1e-6, msg=name)
        if a is not None:
            assert not torch.equal(served[name], w0), f"{name}: B is still 0 after two steps"
    assert merged == 6
    received = torch.load(tmp_path / "received.pt")
    assert result["buckets"] > 2 and list(received) == list(served)
    for name, tensor in served.items():
        assert torch.equal(received[name], tensor), name

    # The checkpoint holds the adapters, not the frozen base; loading it restores the state exactly.
    files = [torch.load(f, weights_only=False) for f in (tmp_path / "state" / "deepspeed").glob("*.pt")]
    modules = [f["module"] for f in files if "module" in f]
    assert len(modules) == 1 and sorted(n.removeprefix("lm.") for n in modules[0]) == result["trainable"], \
        "the checkpoint holds a frozen base weight"
    adapter_numel = sum(before[n].numel() for n in result["trainable"])
    # Every tensor of the checkpoint (module, fp32 master copy, two Adam moments): a few times the adapters.
    assert _numel(files) <= 5 * adapter_numel < sum(p.numel() for p in base_params.values())
    assert result["loaded_steps"] == 2
    for name in before:
        assert torch.equal(result["loaded"][name], after[name]), name
        assert torch.equal(result["after_load_step"][name], result["after_save_step"][name]), name

    # The export: the adapter in peft's format and the merged model, with the peft model's logits.
    adapter_dir = tmp_path / "hf" / "adapter"
    assert (adapter_dir / "adapter_config.json").exists()
    assert len(load_file(str(adapter_dir / "adapter_model.safetensors"))) == 12
    ids = torch.randint(5, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with_adapter = PeftModel.from_pretrained(base, str(adapter_dir)).eval()(ids).logits
        merged_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
        assert not any(".lora_" in n for n in merged_model.state_dict())
        torch.testing.assert_close(merged_model(ids).logits, with_adapter, rtol=1e-5, atol=1e-5)
    exported = result["exported_from"]
    for name, p in PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_student),
                                             str(adapter_dir)).named_parameters():
        key = name.removeprefix("base_model.model.")
        assert torch.equal(p.detach(), exported[key]), key


def test_a_run_whose_target_modules_match_nothing_stops_before_any_pool_starts(tmp_path):
    from driver_fakes import make_trainer, train_config, write_data

    cfg = train_config(tmp_path / "run", write_data(tmp_path), "learner.lora.enabled=true",
                       "learner.lora.target_modules=[q_proj,attn_out]", "learner.lr=1e-3")
    assert cfg.learner.lora.target_modules == ["q_proj", "attn_out"]
    with pytest.raises(ValueError, match=r"learner.lora.target_modules: 'attn_out' matches no module.*'o_proj'"):
        make_trainer(cfg)
    assert not (tmp_path / "run").exists()
