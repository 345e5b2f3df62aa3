"""Prompt datasets, chat templates, the embedded tasks and grading.

Modules (import them directly; this package imports nothing on its own):

- ``tip_ray.data.prompts``: read a prompt file or dataset (``DataConfig``), apply the prompt
  template and chat template, tokenize, filter; ``PromptDataset`` and the resumable
  ``PromptStream`` of ``PromptBatch`` records.
- ``tip_ray.data.grading``: answer extraction and checking (math-verify, exact match), the grader
  registry, pass@k and confidence intervals.
"""
