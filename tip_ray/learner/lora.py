"""LoRA students (peft): adapters injected into the student, and the merged weights it serves.

``apply_lora`` injects peft's LoRA layers into the causal LM in place (its linear layers become
``LoraLayer``s holding the frozen ``base_layer`` and the trainable ``lora_A``/``lora_B``) and
returns the ``PeftModel`` around it; the learner keeps training the causal LM itself, so its
forward and its lm_head are those of the plain model and every parameter keeps its Hugging Face
name, with ``.base_layer`` or ``.lora_A.default``/``.lora_B.default`` inserted.

The rollout engines load the base model's names, so the weights are served as ``served_tensors``:
one per base parameter, under its Hugging Face name, its value merged where a LoRA layer owns it
(``W0 + alpha / r * B @ A``, peft's ``get_delta_weight``), computed per tensor as it is sent; the
training model is never merged in place. Under ZeRO-3 a merged tensor needs its base weight and
both adapter matrices gathered (``ServedTensor.params``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tip_ray.config import LearnerConfig, LoraConfig
from tip_ray.config.learning import LORA_ALL_LINEAR

ADAPTER = "default"  # peft's name of the one adapter
_BASE = ".base_layer"


def _linear_names(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Full names of the linear layers LoRA may adapt: every ``nn.Linear`` but the output embeddings."""
    head = model.get_output_embeddings()
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}


def check_target_modules(model: torch.nn.Module, lora: LoraConfig) -> None:
    """Raise ``ValueError`` (naming ``learner.lora.target_modules`` and the linear layers that
    exist) unless every entry of ``lora.target_modules`` matches a linear layer of ``model``'s
    decoder, peft's way (the module's full name, or a dotted suffix of it), and matches nothing
    else: not the lm_head (the lean loss applies its weight directly, so an adapter there would
    be trained on nothing), nor an embedding or any other kind of module. ``all-linear`` passes."""
    if lora.target_modules == LORA_ALL_LINEAR:
        return
    linear = _linear_names(model)
    known = sorted({name.rsplit(".", 1)[-1] for name in linear})
    for target in lora.target_modules:
        matched = [name for name, _ in model.named_modules() if name == target or name.endswith("." + target)]
        if not matched:
            raise ValueError(f"learner.lora.target_modules: {target!r} matches no module of the student; its "
                             f"linear layers are {known} (or use {LORA_ALL_LINEAR!r})")
        other = [name for name in matched if name not in linear]
        if other:
            raise ValueError(f"learner.lora.target_modules: {target!r} matches {other[:3]}, which are not linear "
                             f"layers of the decoder (the lm_head and embeddings cannot take an adapter here); "
                             f"the linear layers are {known}")


def check_student_targets(learner: LearnerConfig) -> None:
    """The start-up check of ``learner.lora.target_modules`` against ``learner.model``'s
    architecture (built on the meta device from its config: no weights read), before any
    worker starts; nothing to check when LoRA is off."""
    if not learner.lora.enabled:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(learner.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    check_target_modules(model, learner.lora)


def apply_lora(model: torch.nn.Module, lora: LoraConfig):
    """Inject LoRA layers (``lora``: rank, alpha, dropout, targets) into ``model`` in place and
    return the ``peft.PeftModel`` around it; only the adapters' parameters stay trainable. The
    adapters are created in the base weights' dtype and device (``B`` = 0: the merged model starts
    as the base); ``A`` draws from torch's global generator."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    check_target_modules(model, lora)
    targets = lora.target_modules if lora.target_modules == LORA_ALL_LINEAR else list(lora.target_modules)
    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                            bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config, adapter_name=ADAPTER, autocast_adapter_dtype=False)


def is_adapter_parameter(name: str) -> bool:
    """Whether the parameter ``name`` (of the causal LM with LoRA layers) is a LoRA matrix."""
    return ".lora_A." in name or ".lora_B." in name


@dataclass(frozen=True)
class ServedTensor:
    """One tensor the rollout engines load: its Hugging Face ``name``, the model's ``param``
    (partitioned under ZeRO-3) and the LoRA ``layer`` whose base weight it is (None: served as is)."""

    name: str
    param: torch.nn.Parameter
    layer: torch.nn.Module | None = None

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """Every parameter ``value`` reads (what a ZeRO-3 gather must make whole first)."""
        if self.layer is None:
            return [self.param]
        return [self.param, self.layer.lora_A[ADAPTER].weight, self.layer.lora_B[ADAPTER].weight]

    @property
    def shape(self) -> tuple[int, ...]:
        """The full shape (the ZeRO-3 shape when partitioned)."""
        return tuple(getattr(self.param, "ds_shape", self.param.shape))

    @torch.no_grad()
    def value(self) -> torch.Tensor:
        """The tensor as served (its ``params`` must be whole): the parameter, or the merged
        ``W0 + scale * B @ A`` (summed in float32, returned in W0's dtype and device); a new
        tensor in the merged case, the parameter's data otherwise."""
        weight = self.param.detach()
        if self.layer is None:
            return weight
        delta = self.layer.get_delta_weight(ADAPTER)
        return (weight.float() + delta.float()).to(weight.dtype)


def served_tensors(lm: torch.nn.Module) -> list[ServedTensor]:
    """The tensors the rollout engines load, in ``named_parameters`` order (tied weights once):
    every parameter of ``lm`` under its Hugging Face name, the LoRA matrices left out and each
    LoRA layer's base weight merged with its adapter. Without LoRA layers: every parameter as is."""
    modules = dict(lm.named_modules())
    out = []
    for name, param in lm.named_parameters():
        if is_adapter_parameter(name):
            continue
        if _BASE not in name:
            out.append(ServedTensor(name, param))
            continue
        from peft.tuners.lora import LoraLayer  # only a LoRA student gets here

        owner, _, leaf = name.rpartition(_BASE + ".")
        layer = modules[owner]
        merged = isinstance(layer, LoraLayer) and leaf == "weight" and ADAPTER in layer.lora_A
        out.append(ServedTensor(owner + "." + leaf, param, layer if merged else None))
    return out


def adapter_parameters(lm: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The LoRA matrices of ``lm`` by name (``...q_proj.lora_A.default.weight``)."""
    return {name: p for name, p in lm.named_parameters() if is_adapter_parameter(name)}


def save_adapter(peft_model, directory: str, adapter: dict[str, torch.Tensor]) -> None:
    """Write ``adapter`` (whole tensors of ``adapter_parameters``' names) in peft's format under
    ``directory``: adapter_config.json and adapter_model.safetensors, loadable with
    ``PeftModel.from_pretrained(base, directory)``."""
    prefix = "base_model.model."  # the causal LM's place inside the PeftModel
    peft_model.save_pretrained(directory, state_dict={prefix + k: v for k, v in adapter.items()},
                               safe_serialization=True)
