"""Architectures of the embedded teacher and student: small Qwen3 causal LMs.

Head dimension 32 (the CPU build of vLLM needs >= 32); the vocabulary is padded to 128 over the
character tokenizer's ids, as hub checkpoints pad theirs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

VOCAB_SIZE = 128
MAX_POSITIONS = 256


@dataclass(frozen=True)
class ModelShape:
    """The sizes that differ between teacher and student."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int = 32


TEACHER_SHAPE = ModelShape(hidden_size=192, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                           intermediate_size=576)
STUDENT_SHAPE = ModelShape(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=384)


def build_model(shape: ModelShape, tokenizer, seed: int):
    """A freshly initialised ``Qwen3ForCausalLM`` of ``shape`` for ``tokenizer`` (fp32)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MAX_POSITIONS,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **asdict(shape),
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config)
