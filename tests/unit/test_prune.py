"""Depth pruning (`tip_ray.pairs.prune`, `tip-ray prune`) on tiny causal LMs built from configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tip_ray.cli import main
from tip_ray.pairs.prune import PruneError, layers_to_keep, parse_layer_list, prune_checkpoint, prune_model


def tiny_llama(layers: int = 6, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(config).eval()


def save_tiny_llama(path: Path, layers: int = 6) -> Path:
    """A random 6-layer Llama with the character tokenizer (ChatML template) saved at ``path``."""
    from tip_ray.data.tokenizer import build_char_tokenizer

    tiny_llama(layers).save_pretrained(str(path))
    build_char_tokenizer().save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("parent") / "llama")


def test_keep_every_chooses_every_kth_layer_from_the_first():
    assert layers_to_keep(30, keep_every=3) == list(range(0, 30, 3))
    assert layers_to_keep(30, keep_every=3)[-1] == 27 and len(layers_to_keep(30, keep_every=3)) == 10
    assert layers_to_keep(6, keep_every=1) == list(range(6))
    assert layers_to_keep(6, keep_every=10) == [0]
    assert layers_to_keep(6, layers=[1, 4]) == [1, 4]


@pytest.mark.parametrize("kwargs, message", [
    ({"layers": []}, "empty"),
    ({"layers": [0, 2, 2]}, "more than once"),
    ({"layers": [3, 1]}, "increasing"),
    ({"layers": [0, 6]}, "out of range"),
    ({"layers": [-1, 2]}, "out of range"),
    ({"keep_every": 0}, ">= 1"),
    ({"keep_every": -2}, ">= 1"),
    ({"keep_every": 2, "layers": [0]}, "exactly one"),
    ({}, "exactly one"),
])
def test_bad_layer_choices_are_refused_with_the_reason(kwargs, message):
    with pytest.raises(PruneError, match=message):
        layers_to_keep(6, **kwargs)


def test_layer_lists_parse_or_name_the_bad_text():
    assert parse_layer_list("0, 3,6") == [0, 3, 6]
    with pytest.raises(PruneError, match="comma-separated"):
        parse_layer_list("0,three")


def test_kept_layers_equal_the_parents_and_the_config_is_fixed(parent, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    result = prune_checkpoint(parent, tmp_path / "pruned", keep_every=2)
    assert result.kept_layers == (0, 2, 4) and result.parent_layers == 6 and result.layer_path == "model.layers"
    assert result.info.num_hidden_layers == 3
    before = load_file(str(parent / "model.safetensors"))
    after = load_file(str(tmp_path / "pruned" / "model.safetensors"))
    for new, old in enumerate(result.kept_layers):
        names = [k for k in before if k.startswith(f"model.layers.{old}.")]
        assert names
        for name in names:
            assert torch.equal(after[name.replace(f"layers.{old}.", f"layers.{new}.", 1)], before[name]), name
    shared = [k for k in before if not k.startswith("model.layers.")]
    assert shared and all(torch.equal(after[k], before[k]) for k in shared)
    assert not any(k.startswith("model.layers.3.") for k in after)
    config = AutoConfig.from_pretrained(str(tmp_path / "pruned"))
    assert config.num_hidden_layers == 3
    assert AutoTokenizer.from_pretrained(str(tmp_path / "pruned")).chat_template is not None


def test_pruned_model_runs_with_a_kv_cache_and_matches_its_reload(parent, tmp_path):
    """layer_idx renumbered: cached generation in memory equals the reloaded checkpoint's."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(parent))
    prune_model(model, [1, 3, 5])
    attention_slots = [layer.self_attn.layer_idx for layer in model.model.layers]
    assert attention_slots == [0, 1, 2]
    prune_checkpoint(parent, tmp_path / "pruned", layers=[1, 3, 5])
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned")).eval()
    ids = torch.tensor([[5, 17, 42, 9]])
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.eval().generate(ids, **kwargs), reloaded.generate(ids, **kwargs))
    assert torch.allclose(model(ids).logits, reloaded(ids).logits, atol=1e-6)


def test_per_layer_config_lists_keep_the_kept_entries():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    config = Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, layer_types=types,
                         use_sliding_window=True, sliding_window=8)
    model = prune_model(Qwen3ForCausalLM(config), [1, 2])
    assert model.config.num_hidden_layers == 2
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    model(torch.tensor([[1, 2, 3]]))


def test_other_layouts_are_found_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=2, n_positions=32))
    prune_model(model, [0, 3])
    assert model.config.n_layer == 2 and len(model.transformer.h) == 2
    model(torch.tensor([[1, 2, 3]]))


def test_an_architecture_without_a_decoder_layer_list_is_refused():
    model = tiny_llama(4)
    model.model.layers = torch.nn.Sequential(*model.model.layers)  # no ModuleList of num_hidden_layers
    with pytest.raises(PruneError, match="no single decoder layer list"):
        prune_model(model, [0, 2])


def test_cli_prunes_and_reports(parent, tmp_path, capsys):
    assert main(["prune", str(parent), str(tmp_path / "out"), "--layers", "0,5"]) == 0
    assert "kept layers [0, 5] of 6" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("args, message", [
    (["--layers", "0,9"], "out of range"),
    (["--layers", "2,1"], "increasing"),
    (["--layers", "0,x"], "comma-separated"),
    (["--keep-every", "0"], ">= 1"),
])
def test_cli_refuses_bad_layers_before_writing_anything(parent, tmp_path, args, message):
    with pytest.raises(SystemExit, match=message) as info:
        main(["prune", str(parent), str(tmp_path / "out"), *args])
    assert str(info.value).startswith("tip-ray prune: ")
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_a_missing_source_and_an_existing_output(parent, tmp_path):
    with pytest.raises(SystemExit, match="no config.json"):
        main(["prune", str(tmp_path / "nowhere"), str(tmp_path / "out"), "--keep-every", "2"])
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit, match="already exists"):
        main(["prune", str(parent), str(tmp_path / "taken"), "--keep-every", "2"])


def test_cli_needs_one_way_of_choosing_layers(parent, tmp_path):
    with pytest.raises(SystemExit):
        main(["prune", str(parent), str(tmp_path / "out")])
    with pytest.raises(SystemExit):
        main(["prune", str(parent), str(tmp_path / "out"), "--keep-every", "2", "--layers", "0"])


def test_a_failed_write_leaves_nothing_behind(parent, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        prune_checkpoint(parent, tmp_path / "out", keep_every=2)
    assert list(tmp_path.iterdir()) == []
