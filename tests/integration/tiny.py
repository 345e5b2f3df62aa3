"""Helpers shared by the integration tests: tiny Qwen3 checkpoints on disk, reference log-probs."""

from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_model(path: Path, hidden: int = 64, seed: int = 0) -> str:
    """A 2-layer random Qwen3 (head dim 32) with the character tokenizer, saved at ``path``; returns it."""
    from tip_ray.data.tokenizer import build_char_tokenizer
    from tip_ray.embedded.models import ModelShape, build_model

    tokenizer = build_char_tokenizer()
    shape = ModelShape(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=hidden // 32,
                       num_key_value_heads=1, intermediate_size=2 * hidden)
    build_model(shape, tokenizer, seed=seed).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


def save_tiny_pair(root: Path) -> dict[str, str]:
    """A tiny student (hidden 64) and teacher (hidden 96) under ``root``: ``{"student": path, "teacher": path}``."""
    return {name: save_tiny_model(root / name, hidden, seed)
            for name, hidden, seed in (("student", 64, 0), ("teacher", 96, 1))}


def reference_logprobs(model, rollouts) -> list[list[float]]:
    """Per sample of ``rollouts``, the log-probs a transformers forward pass of ``model`` gives its tokens."""
    out = []
    for g in rollouts.generations:
        prompt = list(rollouts.prompt_ids[g.prompt_index])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt + g.token_ids])).logits[0].float(), -1)
        out.append([logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(g.token_ids)])
    return out
