"""The one place that touches vLLM internals: a worker extension for in-place weight updates.

vLLM instantiates this mix-in inside each of its workers (``worker_extension_cls``); the engine
calls its methods through ``LLM.collective_rpc``, so with tensor parallelism every worker runs
them (each joins the weight group with its own rank). Imports stay inside methods.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def _counted(pairs: Iterable[tuple[str, object]], counter: list[int]) -> Iterator[tuple[str, object]]:
    for pair in pairs:
        counter[0] += 1
        yield pair


class WeightUpdateExtension:
    """Methods added to every vLLM worker."""

    def _tip_ray_reload(self, named_tensors: Iterable[tuple[str, object]]) -> int:
        """Reload Hugging Face-named tensors (consumed lazily) in place; returns the count.

        The worker's ``reload_weights`` (under its vLLM config) re-runs vLLM's own loading and
        post-processing (fused projections, CPU weight packing), which a bare
        ``model.load_weights`` after start-up would skip.
        """
        counter = [0]
        try:
            self.reload_weights(weights_iterator=_counted(named_tensors, counter))  # type: ignore[attr-defined]
        except BaseException:
            self._tip_ray_end_broken_reload()
            raise
        return counter[0]

    def _tip_ray_end_broken_reload(self) -> None:
        """Close the layer-wise reload that an exception cut short (a broadcast that broke
        part-way): vLLM leaves the layers that had not received all their tensors on the meta
        device with wrapped loaders, and the next reload fails on them. Finishing it puts back
        the old weights of the layers that received nothing and processes the others with what
        arrived, so a later full reload starts clean; until then the weights are a mix that
        must not be served (``tip_ray.rollout.worker`` refuses to generate with them)."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        runner = self.model_runner  # type: ignore[attr-defined]
        with set_current_vllm_config(self.vllm_config):  # type: ignore[attr-defined]
            finalize_layerwise_reload(runner.get_model(), self.vllm_config.model_config)  # type: ignore[attr-defined]

    def tip_ray_load_weights(self, named_tensors: list[tuple[str, object]]) -> int:
        """Reload a full list of Hugging Face-named tensors in place; returns the count."""
        return self._tip_ray_reload(named_tensors)

    def tip_ray_join_weight_group(
        self, plan: tuple, host: str, port: int, first_rank: int, world_size: int, backend: str, timeout_s: float
    ) -> int:
        """Join the weight group at ``host:port`` as rank ``first_rank`` + this worker's tensor
        parallel rank, replacing any group joined before; returns the rank taken."""
        from vllm.distributed import get_tensor_model_parallel_rank

        from tip_ray.sync.process_group import WeightGroup

        self.tip_ray_close_weight_group()
        rank = first_rank + get_tensor_model_parallel_rank()
        self._tip_ray_weight_group = WeightGroup(plan, rank, world_size, backend, timeout_s, host=host, port=port)
        return rank

    def tip_ray_receive_weights(self, load: bool) -> int:
        """Receive one broadcast of the full weights, bucket by bucket, loading each bucket's
        tensors as it lands (``load``) or only draining them (a refused update still takes its
        part in the broadcast, so the group stays in step). Returns the tensors received."""
        group = getattr(self, "_tip_ray_weight_group", None)
        if group is None:
            raise RuntimeError("this vLLM worker has not joined a weight group (tip_ray_join_weight_group)")
        received = group.receive()
        try:
            return self._tip_ray_reload(received) if load else sum(1 for _ in received)
        finally:
            for _ in received:  # whatever a failed load left, so that the sender is not left waiting
                pass

    def tip_ray_close_weight_group(self) -> None:
        """Leave the weight group, if any."""
        group = getattr(self, "_tip_ray_weight_group", None)
        if group is not None:
            group.close()
        self._tip_ray_weight_group = None
