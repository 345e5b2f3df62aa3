"""A bigger student/teacher pair for the throughput benchmarks: the embedded pair's architecture,
tokenizer and vocabulary (so its prompts and data work unchanged), wider and deeper, with random
weights.

Throughput does not need trained weights: both sides of a comparison sample from the same
models, and response lengths are reported with every result. Random weights rarely emit the end
token (probability about 1/128 per token), so most responses run to ``max_new_tokens``.

Usage:
    python bench/scaled_pair.py --out runs/bench_pair/m                      # student 3.3M, teacher 11M
    python bench/scaled_pair.py --out runs/bench_pair/l --student 384x4 --teacher 640x6
Writes <out>/student and <out>/teacher (safetensors, config, tokenizer) and prints their sizes.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_shape(text: str):
    """``HIDDENxLAYERS`` (e.g. ``512x8``) as a ``ModelShape``: head size 32 (as the embedded
    pair), a quarter of the heads for keys/values, a 3x MLP."""
    from tip_ray.embedded.models import ModelShape

    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected HIDDENxLAYERS such as 512x8, got {text!r}")
    hidden, layers = int(match[1]), int(match[2])
    if hidden % 32 or hidden < 64:
        raise argparse.ArgumentTypeError(f"the hidden size must be a multiple of 32 and >= 64, got {hidden}")
    heads = hidden // 32
    kv_heads = max(1, heads // 4)
    return ModelShape(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads if heads % kv_heads == 0 else 1, intermediate_size=3 * hidden)


def main() -> int:
    """Build and save the pair."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for student/ and teacher/")
    parser.add_argument("--student", type=parse_shape, default=parse_shape("256x4"), help="HIDDENxLAYERS (256x4)")
    parser.add_argument("--teacher", type=parse_shape, default=parse_shape("384x6"), help="HIDDENxLAYERS (384x6)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from tip_ray.data.tokenizer import build_char_tokenizer
    from tip_ray.embedded.models import build_model

    tokenizer = build_char_tokenizer()
    for role, shape, seed in (("student", args.student, args.seed), ("teacher", args.teacher, args.seed + 1)):
        model = build_model(shape, tokenizer, seed)
        path = Path(args.out) / role
        model.save_pretrained(str(path), safe_serialization=True)
        tokenizer.save_pretrained(str(path))
        params = sum(p.numel() for p in model.parameters())
        print(f"{role}: {params / 1e6:.2f}M parameters ({shape.hidden_size} wide, {shape.num_hidden_layers} layers) "
              f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
