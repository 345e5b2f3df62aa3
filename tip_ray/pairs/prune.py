"""Depth pruning of a transformers causal LM: keep some decoder layers, drop the rest.

``prune_checkpoint(src, out, keep_every=3)`` keeps layers 0, 3, 6, ... (10 of 30 for SmolLM2);
``layers=[0, 3, 6]`` keeps an explicit list. The embeddings, final norm and head are kept as
they are. The pruned model's config gets the new ``num_hidden_layers`` and the kept entries of
every per-layer list (``layer_types`` and the like), and every ``layer_idx`` attribute inside a
kept layer (the attention's KV-cache slot) is renumbered to the layer's new position. Distilling
such a model back towards its parent is Minitron's recipe; the student starts far from it.

Every input is checked before any weight is loaded or any file is written: ``PruneError`` names
what is wrong. Output is written atomically (temporary directory, then rename).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tip_ray.pairs.atomic import atomic_directory
from tip_ray.pairs.convert import CheckpointInfo, checkpoint_info

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class PruneError(ValueError):
    """A pruning request that cannot be carried out; the message names the problem."""


@dataclass(frozen=True)
class PruneResult:
    """A written pruned checkpoint: what it holds, which parent layers it kept, from where."""

    info: CheckpointInfo
    kept_layers: tuple[int, ...]
    parent_layers: int
    source: str
    layer_path: str


def parse_layer_list(text: str) -> list[int]:
    """``"0,3,6"`` -> ``[0, 3, 6]``; ``PruneError`` for an entry that is not an integer."""
    entries = [part.strip() for part in text.split(",")]
    try:
        return [int(part) for part in entries if part]
    except ValueError:
        raise PruneError(f"--layers must be comma-separated layer indices such as 0,3,6; got {text!r}") from None


def layers_to_keep(num_layers: int, keep_every: int | None = None, layers: Sequence[int] | None = None) -> list[int]:
    """The sorted layer indices to keep out of ``num_layers``: ``range(0, num_layers, keep_every)``
    or the explicit ``layers`` (exactly one of the two), validated: non-empty, in range, no
    duplicates, increasing. Raises ``PruneError`` naming the problem."""
    if (keep_every is None) == (layers is None):
        raise PruneError("give exactly one of keep_every (--keep-every K) and layers (--layers 0,3,6)")
    if num_layers < 1:
        raise PruneError(f"the model has {num_layers} layers; nothing to prune")
    if keep_every is not None:
        if isinstance(keep_every, bool) or not isinstance(keep_every, int) or keep_every < 1:
            raise PruneError(f"keep_every must be an integer >= 1, got {keep_every!r}")
        return list(range(0, num_layers, keep_every))
    keep = list(layers or [])
    if not keep:
        raise PruneError("the layer list is empty: keep at least one layer")
    if any(isinstance(i, bool) or not isinstance(i, int) for i in keep):
        raise PruneError(f"layer indices must be integers, got {keep}")
    outside = [i for i in keep if not 0 <= i < num_layers]
    if outside:
        raise PruneError(f"layers {outside} are out of range: the model has layers 0..{num_layers - 1}")
    duplicates = sorted({i for i in keep if keep.count(i) > 1})
    if duplicates:
        raise PruneError(f"layers {duplicates} are listed more than once")
    if keep != sorted(keep):
        raise PruneError(f"the layer list must be increasing (layers keep their order), got {keep}")
    return keep


def _text_config(config):
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not isinstance(getattr(text, "num_hidden_layers", None), int):
        raise PruneError(f"{type(config).__name__} has no integer num_hidden_layers: not a decoder this can prune")
    return text


def find_decoder_layers(model) -> tuple[str, object]:
    """``(dotted name, ModuleList)`` of the model's decoder layers: the one ``nn.ModuleList`` with
    ``num_hidden_layers`` entries (``model.layers`` for Llama/Qwen, ``transformer.h`` for GPT-2).
    ``PruneError`` when there is none, or more than one candidate."""
    import torch.nn as nn

    n = _text_config(model.config).num_hidden_layers
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) == n]
    if len(found) != 1:
        names = [name for name, _ in found]
        problem = "no" if not found else f"{len(found)} ({names})"
        raise PruneError(f"{type(model).__name__}: {problem} module lists of {n} decoder layers "
                         "(num_hidden_layers); this architecture has no single decoder layer list to prune")
    return found[0]


def prune_model(model, keep: Sequence[int]):
    """Keep only the decoder layers ``keep`` of ``model`` (in place; returns it).

    Fixes ``num_hidden_layers``, every config list with one entry per layer, and every
    ``layer_idx`` attribute inside the kept layers. ``keep`` is validated by ``layers_to_keep``.
    Device and dtype are left as they are.
    """
    import torch.nn as nn

    text = _text_config(model.config)
    old = text.num_hidden_layers
    keep = layers_to_keep(old, layers=list(keep))
    name, layer_list = find_decoder_layers(model)
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    kept = nn.ModuleList([layer_list[i] for i in keep])
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index  # the KV-cache slot: positions in the new stack
    setattr(parent, attribute, kept)
    for key, value in list(vars(text).items()):
        if isinstance(value, (list, tuple)) and len(value) == old and not key.startswith("_"):
            setattr(text, key, type(value)(value[i] for i in keep))
    text.num_hidden_layers = len(keep)
    return model


def prune_checkpoint(src: str | Path, out: str | Path, keep_every: int | None = None,
                     layers: Sequence[int] | None = None, replace: bool = False) -> PruneResult:
    """Load the causal LM at ``src`` (its own dtype, CPU), keep the layers chosen by ``keep_every``
    or ``layers``, and write ``out`` (safetensors, config, generation config, tokenizer files when
    ``src`` has a tokenizer) atomically. ``out`` must not exist unless ``replace`` (then it is
    swapped for the new checkpoint only once that is complete).

    Raises ``PruneError`` for a missing source, an existing output, a bad layer choice or an
    architecture without a decoder layer list, before anything is written.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_path, out_path = Path(src), Path(out)
    if not (src_path / "config.json").is_file():
        raise PruneError(f"{src}: not a Hugging Face checkpoint directory (no config.json)")
    if out_path.exists() and not replace:
        raise PruneError(f"{out}: already exists; remove it or choose another output directory")
    try:
        config = AutoConfig.from_pretrained(str(src_path))
    except (OSError, ValueError, KeyError) as exc:
        raise PruneError(f"{src}: cannot read its config ({type(exc).__name__}: {exc})") from None
    keep = layers_to_keep(_text_config(config).num_hidden_layers, keep_every, layers)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(src_path), dtype="auto")
    except ValueError as exc:  # transformers' "Unrecognized configuration class ... for AutoModelForCausalLM"
        raise PruneError(f"{src}: not a causal LM transformers can load ({exc})") from None
    parent_layers = _text_config(model.config).num_hidden_layers
    layer_path, _ = find_decoder_layers(model)
    prune_model(model, keep)
    has_tokenizer = any((src_path / name).is_file() for name in _TOKENIZER_FILES)
    tokenizer = AutoTokenizer.from_pretrained(str(src_path)) if has_tokenizer else None
    with atomic_directory(out_path, replace=replace) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return PruneResult(checkpoint_info(model, out_path), tuple(keep), parent_layers, str(src_path), layer_path)
