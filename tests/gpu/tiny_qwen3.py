"""Tiny random Qwen3-shaped checkpoints at a real vocabulary, for the CUDA checks.

Shared by ``tests/gpu`` and ``bench/gpu_check.py``: the shapes users train (vocabulary 151,936,
bf16 weights, grouped-query attention, untied lm_head) at a size that builds in seconds.
"""

from __future__ import annotations

from pathlib import Path

QWEN3_VOCAB = 151_936


def save_qwen3(path: Path, vocab_size: int = QWEN3_VOCAB, hidden: int = 256, layers: int = 2, heads: int = 4,
               kv_heads: int = 2, head_dim: int = 64, seed: int = 0, dtype: str = "bfloat16") -> str:
    """A random ``Qwen3ForCausalLM`` (``layers`` x ``hidden``, untied lm_head of ``vocab_size`` rows) saved
    as safetensors in ``dtype`` at ``path``, with the character tokenizer (ids below 128); returns the path.

    Built on the CPU; the caller moves it wherever it trains.
    """
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tip_ray.data.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                         intermediate_size=3 * hidden, max_position_embeddings=4096, rope_theta=10000.0,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, torch_dtype=dtype)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)
