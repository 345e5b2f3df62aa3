"""The student as DeepSpeed wraps it: the causal LM loaded from ``learner.model``, seen through a
module whose forward stops at the final hidden states (the lean loss applies the lm_head)."""

from __future__ import annotations

import torch

from tip_ray.config import LearnerConfig


class _HiddenStates(torch.nn.Module):
    """The causal LM seen by DeepSpeed: its forward stops at the final hidden states.

    DeepSpeed's engine must run every forward (ZeRO-3 loses accumulated gradients when
    submodules are called around it); the lm_head is applied by the lean loss instead.
    """

    def __init__(self, causal_lm: torch.nn.Module, peft_model: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.lm = causal_lm
        # The PeftModel around ``lm`` (LoRA students; it writes the adapter), kept out of the module
        # tree so that DeepSpeed sees each parameter once, under its Hugging Face name.
        self.__dict__["peft_model"] = peft_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, L, H] of ``input_ids``/``attention_mask`` [B, L] (on the model's
        device); no KV cache is built (training never reuses one)."""
        return self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                     use_cache=False).last_hidden_state


def build_student(learner: LearnerConfig) -> _HiddenStates:
    """The student as DeepSpeed will wrap it: ``learner.model`` loaded in ``learner.dtype`` on the
    CPU (DeepSpeed moves or partitions it), with transformers' non-reentrant gradient
    checkpointing on every decoder layer when ``learner.gradient_checkpointing``.

    Checkpointing is enabled on the causal LM before DeepSpeed wraps it, so ZeRO-3's parameter
    hooks run (and gather) again during the recompute; every student parameter is trainable,
    which non-reentrant checkpointing under ZeRO-3 needs (a frozen, partitioned parameter
    would be recomputed at size 0). transformers checkpoints only in training mode, so the model
    is put in it then; otherwise it stays in evaluation mode, as loaded. A student with dropout is
    refused with checkpointing: the statistics pass and the gradient pass would see different
    dropout masks, so tokens would be selected on one forward and trained on another.

    With ``learner.lora.enabled`` the LoRA layers are injected last (``tip_ray.learner.lora``): only
    the adapters are trainable, and ``peft_model`` holds the ``PeftModel`` around ``lm``. That
    frozen base does recompute correctly under ZeRO-3 with checkpointing (DeepSpeed 0.19, CPU: the
    same adapter updates as ZeRO-2 without it, tests/unit/test_lora.py).
    """
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if learner.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(learner.model, dtype=dtype)
    if learner.gradient_checkpointing:
        dropouts = {name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0}
        dropouts.update({key: value for key, value in model.config.to_dict().items()
                         if ("dropout" in key or "pdrop" in key) and isinstance(value, float) and value > 0})
        if dropouts:
            raise ValueError(f"learner.gradient_checkpointing needs a student without dropout, but {learner.model} has "
                             f"{dropouts}; set those to 0 in its config.json or turn gradient_checkpointing off")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    if learner.lora.enabled:
        from tip_ray.learner.lora import apply_lora

        return _HiddenStates(model, apply_lora(model, learner.lora))
    return _HiddenStates(model)
