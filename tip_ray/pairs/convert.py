"""GGUF -> safetensors Hugging Face checkpoint, through transformers' GGUF loader.

transformers reads a GGUF file with the ``gguf`` package and de-quantises every tensor to float
(``from_pretrained(dir, gguf_file=name)``); the model it returns is marked quantised
(``config.quantization_config``) and refuses ``save_pretrained``. The weights are therefore
loaded into a fresh model built from the config without its quantisation entry, and saved with
the tokenizer (vocabulary, special tokens, chat template) and generation config beside them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from tip_ray.pairs.atomic import atomic_directory

DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class CheckpointInfo:
    """What a written checkpoint holds: layers, hidden size, vocabulary rows, parameters, dtype."""

    path: Path
    num_hidden_layers: int
    hidden_size: int
    vocab_size: int
    parameters: int
    dtype: str


def checkpoint_info(model, path: Path) -> CheckpointInfo:
    """The ``CheckpointInfo`` of ``model`` (a transformers causal LM) saved at ``path``."""
    text = model.config.get_text_config()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return CheckpointInfo(Path(path), int(text.num_hidden_layers), int(text.hidden_size), int(text.vocab_size),
                          sum(p.numel() for p in model.parameters()), dtype)


def load_gguf(gguf_path: str | Path):
    """``(model, tokenizer)`` from a GGUF file, de-quantised to float32 on the CPU.

    The model is the one transformers builds (``LlamaForCausalLM`` for SmolLM2), still marked
    quantised; use ``convert_gguf`` to write a checkpoint.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32",
                 replace: bool = False) -> CheckpointInfo:
    """Write ``out_dir``: the GGUF model as a safetensors checkpoint in ``dtype`` (``float32``, which
    the CPU runs, or ``bfloat16``), with ``config.json`` (no quantisation entry),
    ``generation_config.json`` and the tokenizer files (chat template included).

    Written atomically (a temporary directory renamed into place); an existing ``out_dir`` raises
    ``FileExistsError`` unless ``replace``. Runs on the CPU (about 20 s for SmolLM2-135M).
    """
    import torch
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if Path(out_dir).exists() and not replace:
        raise FileExistsError(f"{out_dir} already exists")
    loaded, tokenizer = load_gguf(gguf_path)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.load_state_dict(loaded.state_dict(), strict=True)  # copies into the fresh dtype
    model.generation_config = copy.deepcopy(loaded.generation_config)
    del loaded
    with atomic_directory(out_dir, replace=replace) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    return checkpoint_info(model, Path(out_dir))
