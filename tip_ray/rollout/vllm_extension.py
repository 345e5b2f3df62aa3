"""The one place that touches vLLM internals: a worker extension for in-place weight updates.

vLLM instantiates this mix-in inside each of its workers (``worker_extension_cls``); the engine
calls its methods through ``LLM.collective_rpc``. Imports stay inside methods.
"""

from __future__ import annotations


class WeightUpdateExtension:
    """Methods added to every vLLM worker."""

    def tip_ray_load_weights(self, named_tensors: list[tuple[str, object]]) -> int:
        """Reload Hugging Face-named tensors into the running model in place; returns the count.

        ``reload_weights`` re-runs vLLM's own loading and post-processing (fused projections,
        CPU weight packing), which a bare ``model.load_weights`` after start-up would skip.
        """
        self.model_runner.reload_weights(weights_iterator=iter(named_tensors))  # type: ignore[attr-defined]
        return len(named_tensors)
