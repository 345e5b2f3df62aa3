"""The learner rank: a DeepSpeed ZeRO engine that trains the student on the selected tokens.

A plain class (the Ray actor is a thin shell around it), one per rank of a torch.distributed
group whose rendezvous is in the environment (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE).

One optimizer step::

    forward_backward(batch)   pass 1: backbone -> hidden states -> per-token statistics
                              (chunked lm_head, no gradient); gather the statistics of every
                              rank and select over the global batch (budget B is global);
                              pass 2: lean kept-token loss -> backward, one micro-batch at a
                              time (gradient accumulation). Pass 2 reuses pass 1's hidden states
                              and graph (``learner.single_forward``) or runs the backbone again.
                              Under the rule ``all`` with a float32 student nothing waits for the
                              statistics: pass 1 runs the backbone alone (its finiteness check)
                              and pass 2's loss reports them from its own lm_head chunks.
    optim_step()              clip, step, schedule
    train_step(batch)         both, in one call (what the Ray actor runs each step)
    export_weights()          the full student weights (gathered from ZeRO-3 shards; a LoRA
                              student's merged with its adapters, under the base model's names)
    evaluate_tokens(batch)    held-out evaluation: per-token reverse KL of the current weights to
                              the teacher, no gradient, nothing selected, nothing stepped

Each rank's loss is its share of the global kept-token mean, scaled by the world size because
DeepSpeed averages gradients over ranks: the step's gradient is that of the global mean.

Devices: the batch is moved to the engine's device once per step (``tip_ray.devices.to_device``) and
the model refuses inputs anywhere else; selection runs on the CPU (the global statistics table,
a few floats per token, with a CPU generator for reproducibility); every collective goes
through ``collectives``, which places its tensors on the process group's device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import resource
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tip_ray.config import LearnerConfig, LossConfig, SelectionConfig
from tip_ray.devices import to_device
from tip_ray.learner import collectives
from tip_ray.learner.engine_config import deepspeed_config
from tip_ray.learner.lora import adapter_parameters, save_adapter, served_tensors
from tip_ray.learner.student import build_student
from tip_ray.sync.buckets import Bucket, TensorMeta, dtype_name
from tip_ray.tip.lean import kept_token_losses
from tip_ray.tip.lean_stats import token_stats_from_hidden
from tip_ray.tip.select import get_rule, quadrants, select_flat
from tip_ray.tip.stats import STAT_NAMES, TokenStats
from tip_ray.types import TrainBatch


@dataclass(frozen=True)
class StepMetrics:
    """What one learner step reports (global over ranks)."""

    loss: float
    kept_tokens: int
    valid_tokens: int
    kept_fraction: float
    quadrant_shares: dict[str, float]
    entropy_mean: float
    entropy_kept_mean: float
    rkl_mean: float
    rkl_kept_mean: float
    peak_memory_bytes: int = 0
    skipped: bool = False
    # Wall seconds of this rank's phases: statistics (pass 1: backbone and lm_head, no gradient;
    # the backbone alone under `all`, whose loss reports the statistics), selection (the global
    # gather and the rule), gradient (the kept-token loss and the backward),
    # optimizer (clip, step, schedule; filled in by train_step).
    phase_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    # The task-reward term (loss.reward) before its coefficient: sum -A log p(y) over the global
    # batch's response tokens / their count; None when the term is off. ``loss`` stays the
    # distillation loss alone.
    reward_loss: float | None = None
    # Per teacher (``TrainBatch.group`` index; empty without groups): kept fraction, reverse KL,
    # quadrant shares ... of its sequences' tokens (``_group_metrics``).
    groups: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)


def _peak_memory_bytes() -> int:
    """Peak memory of this step on the accelerator (CUDA), or the process's peak RSS on CPU;
    the maximum over ranks."""
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return int(collectives.max_over_ranks(float(peak)))


def _table_stats(table: torch.Tensor) -> TokenStats:
    """The statistics table [m, D] (``STAT_NAMES`` columns, then the token id) as one row of
    ``TokenStats`` [1, m] (what ``quadrants`` reads)."""
    values = {n: table[:, j].float().unsqueeze(0) for j, n in enumerate(STAT_NAMES)}
    return TokenStats(**values, token_ids=table[:, len(STAT_NAMES)].long().unsqueeze(0),
                      mask=torch.ones(1, table.shape[0], dtype=torch.bool), vocab_size=0)


def _finite_on_mask(stats: TokenStats) -> bool:
    """Whether every statistic is finite at the valid positions of ``stats``."""
    return all(bool(torch.isfinite(getattr(stats, n)[stats.mask]).all()) for n in STAT_NAMES)


class NonFiniteWeightsError(RuntimeError):
    """The learner's weights hold NaN or inf (they must not be saved or served)."""


class LearnerWorker:
    """One rank of the learner group (see the module docstring)."""

    def __init__(self, learner: LearnerConfig, selection: SelectionConfig, loss: LossConfig) -> None:
        import deepspeed

        self.cfg, self.selection, self.loss_cfg = learner, selection, loss
        self.rule_params = dict(selection.params)  # plus the rock ids of selection.rock_file, read once
        if selection.rock_file:
            from tip_ray.tip.rocks import load_rock_ids

            self.rule_params["rock_ids"] = load_rock_ids(selection.rock_file)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend)
        if dist.get_world_size() != learner.world_size:
            raise ValueError(f"learner.world_size is {learner.world_size} but the process group has "
                             f"{dist.get_world_size()} ranks")
        torch.manual_seed(learner.seed)
        student = build_student(learner)
        params = [p for p in student.parameters() if p.requires_grad]
        if learner.optimizer == "adamw":
            # fused: one kernel per flat ZeRO partition instead of a dozen elementwise passes over
            # it (CPU and CUDA alike): the step of a 64M-parameter student on one CPU thread took
            # 0.47 s unfused.
            optimizer = torch.optim.AdamW(params, lr=learner.lr, betas=tuple(learner.betas),
                                          weight_decay=learner.weight_decay, fused=True)
        else:
            optimizer = torch.optim.SGD(params, lr=learner.lr, weight_decay=learner.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        self.engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=deepspeed_config(learner))
        self.device = torch.device(self.engine.device)
        # DeepSpeed reports the gradient norm from its ZeRO and bf16 optimizers; ZeRO-0 in fp32
        # steps the torch optimizer itself and keeps no norm, so the worker measures it.
        self._measures_grad_norm = self.engine.optimizer is optimizer
        self.steps = 0
        # Under `all` the selection reads no statistic: the kept-token loss, which runs the
        # lm_head on every valid row anyway, reports them from its own chunk logits instead of a
        # statistics pass over the same rows (one lm_head pass fewer). Only where both would
        # compute the same float32 logits; a bf16 head's statistics come from its upcast copy.
        self.fused_statistics = get_rule(selection.rule).kind == "all" and learner.dtype == "fp32"
        self.lora = learner.lora.enabled
        # What the rollout engines load, in order (a LoRA student's base weights merged as sent).
        self._served = served_tensors(self.engine.module.lm)

    def _lr_factor(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    # -------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lm_head(self):
        """The lm_head's weight and bias, gathered from the shards under ZeRO-3."""
        head = self.engine.module.lm.get_output_embeddings()
        tensors = [t for t in (head.weight, getattr(head, "bias", None)) if t is not None]
        if self.cfg.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(tensors, modifier_rank=None):
                yield head.weight, getattr(head, "bias", None)
        else:
            yield head.weight, getattr(head, "bias", None)

    def place(self, batch: TrainBatch) -> TrainBatch:
        """``batch`` with every tensor (ids, masks, teacher signal) on the engine's device: the one
        way a batch reaches the model (``forward_backward`` calls it once per step)."""
        return to_device(batch, self.device)

    def _hidden(self, batch: TrainBatch) -> torch.Tensor:
        """Final hidden states [B, L-1, H] of the positions that predict the next token; ``batch``
        must have come through ``place``."""
        for name, tensor in (("input_ids", batch.input_ids), ("attention_mask", batch.attention_mask)):
            if tensor.device != self.device:
                raise RuntimeError(f"batch.{name} is on {tensor.device}, the engine on {self.device}: "
                                   "batches reach the model through LearnerWorker.place")
        return self.engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[:, :-1]

    def _micro_batches(self, batch: TrainBatch) -> list[TrainBatch]:
        """The rank's sequences, longest first, in micro-batches each cut to its longest row (no
        compute on columns that are padding in the whole micro-batch)."""
        per_rank = self.cfg.global_batch_size // self.cfg.world_size
        if batch.size != per_rank:
            raise ValueError(f"a learner rank takes global_batch_size / world_size = {per_rank} sequences, "
                             f"got {batch.size}")
        size = self.cfg.micro_batch_size
        order = torch.argsort(batch.lengths, descending=True, stable=True)
        return [batch.take(order[i : i + size]) for i in range(0, batch.size, size)]

    def _statistics(
        self, micro: list[TrainBatch], keep_graph: bool, with_stats: bool = True,
    ) -> tuple[list[TokenStats], list[torch.Tensor | None]] | None:
        """Per-token statistics of every micro-batch (none without ``with_stats``: the backbone
        and the finiteness check alone), and its hidden states with their graph when
        ``keep_graph`` (else None each: the gradient pass runs the backbone again). None on every
        rank if any rank saw NaN/inf in its hidden states or teacher log-probs (every rank still
        runs every forward: ZeRO-3 gathers parameters collectively)."""
        stats, hiddens, finite, error = [], [], True, None
        for mb in micro:
            with contextlib.nullcontext() if keep_graph else torch.no_grad():
                hidden = self._hidden(mb)
            hiddens.append(hidden if keep_graph else None)
            mask = mb.loss_mask
            with torch.no_grad():
                # Absent slots (-inf: a teacher with a smaller top-K) are not NaN/inf values.
                finite = finite and bool(torch.isfinite(hidden[mask]).all()) and mb.teacher.finite_at(mask)
                if not with_stats:  # the same on every rank: no rank gathers the head here
                    continue
                # Every rank enters the gather for every micro-batch (under ZeRO-3 it is a collective),
                # whatever it then computes.
                with self._lm_head() as (weight, bias):
                    if not finite or error is not None:
                        continue
                    try:
                        # The head stays in its dtype: the statistics upcast a block of it at a
                        # time, not a float32 copy of the whole head per micro-batch.
                        stats.append(token_stats_from_hidden(
                            hidden.detach(), weight, mb.teacher, mb.targets, mb.loss_mask, lm_head_bias=bias,
                            ta_k=self.cfg.ta_k, chunk_rows=self.cfg.chunk_rows, vocab_chunk=self.cfg.vocab_chunk))
                    except ValueError as exc:  # bad input on this rank: every rank must hear of it
                        error = error or str(exc)
        if not collectives.all_ranks_agree(error is None):
            raise ValueError(f"learner rank {dist.get_rank()}: " + (error or "another rank rejected its batch"))
        finite = finite and all(_finite_on_mask(st) for st in stats)
        return (stats, hiddens) if collectives.all_ranks_agree(finite) else None

    def _select(
        self, micro: list[TrainBatch], stats: list[TokenStats]
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Loss weights [B_mb, L-1] per micro-batch, the global statistics table [m, D] and this
        rank's flat weights [m_r] (in table order), all float32 or float64 on the CPU (the
        caller places the weights)."""
        sel = self.selection
        local = self._local_table(micro, stats)
        everything, offset = collectives.all_gather_rows(local)
        generator = torch.Generator().manual_seed(sel.seed * 1_000_003 + self.steps)

        def choose(table: torch.Tensor) -> torch.Tensor:
            values = {n: table[:, j].float() for j, n in enumerate(STAT_NAMES)}
            return select_flat(values, table[:, len(STAT_NAMES)].long(), table[:, len(STAT_NAMES) + 1].long(),
                               sel.rule, sel.ratio, generator, direction=sel.direction,
                               scope="sequence" if sel.scope == "sequence" else "batch", **self.rule_params)

        if sel.scope in ("global", "sequence"):
            weights_flat = choose(everything)[offset : offset + local.shape[0]]
        elif sel.scope == "rank":
            weights_flat = choose(local)
        else:  # micro_batch
            parts = [choose(local[local[:, -1] == i]) for i in range(len(micro))]
            weights_flat = torch.cat(parts) if parts else torch.zeros(0)

        per_micro, start = [], 0
        for st in stats:
            mask = st.mask.cpu()
            n = int(mask.sum())
            w = torch.zeros(mask.shape, dtype=torch.float32)
            w[mask] = weights_flat[start : start + n].float()
            per_micro.append(w)
            start += n
        return per_micro, everything, weights_flat

    def _local_table(self, micro: list[TrainBatch], stats: list[TokenStats]) -> torch.Tensor:
        """This rank's rows of the global statistics table, float64 [m_r, D] on the CPU: per valid
        position (micro-batches in order, row-major) the ``STAT_NAMES`` columns, the token id, the
        sequence's row in the global batch and the micro-batch index."""
        per_rank = self.cfg.global_batch_size // dist.get_world_size()
        columns, seq_offset = [], dist.get_rank() * per_rank
        for i, (mb, st) in enumerate(zip(micro, stats)):
            mask = st.mask.cpu()
            rows = torch.arange(mb.size).unsqueeze(-1).expand_as(mask)[mask] + seq_offset + i * mb.size
            values = torch.stack([getattr(st, n)[st.mask].double() for n in STAT_NAMES]
                                 + [st.token_ids[st.mask].double()], 1).cpu()
            columns.append(torch.cat([values, torch.stack([rows.double(), torch.full_like(rows, i).double()], 1)], 1))
        return torch.cat(columns) if columns else torch.zeros(0, len(STAT_NAMES) + 3, dtype=torch.float64)

    def forward_backward(self, batch: TrainBatch) -> StepMetrics:
        """Statistics, global selection, and the kept-token loss's backward for this rank's batch
        (with ``loss.reward`` on, plus the task-reward term on every response token of the
        sequences with a non-zero ``batch.advantages``)."""
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        reward = self._reward_coef(batch)
        clock = time.perf_counter()
        batch = self.place(batch)
        micro = self._micro_batches(batch)
        fused = self.fused_statistics
        measured = self._statistics(micro, keep_graph=self.cfg.uses_single_forward, with_stats=not fused)
        phases = {"statistics": time.perf_counter() - clock}
        if measured is None:
            # NaN/inf in the student's or the teacher's numbers: no backward, no step, on any rank.
            return dataclasses.replace(self._skipped_metrics(micro), phase_seconds=phases)
        stats, hiddens = measured
        clock = time.perf_counter()
        if fused:  # `all`: every valid token, weight 1; the statistics come with the loss
            weights, table, local_weights = [mb.loss_mask.to(torch.float32) for mb in micro], None, None
        else:
            weights, table, local_weights = self._select(micro, stats)
        world = dist.get_world_size()

        totals = collectives.all_reduce(torch.tensor(
            [sum(float(w.sum()) for w in weights), float(sum(int(mb.loss_mask.sum()) for mb in micro)),
             float(sum(int((w != 0).sum()) for w in weights))], dtype=torch.float64))
        denominator = float(totals[0] if self.loss_cfg.normalization == "kept" else totals[1])

        phases["selection"] = time.perf_counter() - clock
        clock = time.perf_counter()
        loss_sum = reward_sum = 0.0
        for i, (mb, w) in enumerate(zip(micro, weights)):
            hidden = hiddens[i] if hiddens[i] is not None else self._hidden(mb)
            hiddens[i] = None  # the graph is freed by its backward
            with self._lm_head() as (weight, bias):
                # float32 weights on the engine's device: soft weights are not rounded to bf16.
                # The reward term is a token mean over the global batch's response tokens (totals[1]).
                try:
                    losses = kept_token_losses(
                        hidden, weight, mb.teacher, mb.targets, to_device(w, self.device, float_dtype=torch.float32),
                        mb.loss_mask, lm_head_bias=bias,
                        kind=self.loss_cfg.kind, beta=self.loss_cfg.beta, normalization=self.loss_cfg.normalization,
                        denominator=denominator, chunk_rows=self.cfg.chunk_rows,
                        advantages=mb.advantages, reward_coef=reward or 1.0, reward_denominator=float(totals[1]),
                        with_stats=fused, ta_k=self.cfg.ta_k, vocab_chunk=self.cfg.vocab_chunk,
                    )
                    error = None
                except ValueError as exc:
                    if not fused:
                        raise
                    error = str(exc)
                if fused:
                    # Every rank hears of bad statistics before any rank's backward reduces: the
                    # earlier micro-batches' gradients are accumulated already, so the step cannot
                    # be skipped as pass 1 skips it; it is refused on every rank.
                    if error is None and not _finite_on_mask(losses.stats):
                        error = "the student's statistics hold NaN or inf at a response position"
                    if not collectives.all_ranks_agree(error is None):
                        raise ValueError(f"learner rank {dist.get_rank()}: "
                                         + (error or "another rank rejected its batch"))
                    stats.append(losses.stats)
                # DeepSpeed averages gradients over ranks; the world-size factor undoes it.
                self.engine.backward(losses.loss * world, scale_wrt_gas=False)
            loss_sum += float(losses.distill)
            reward_sum += float(losses.reward)
            if i < len(micro) - 1:
                self.engine.step()  # accumulation only: DeepSpeed steps at the boundary
        phases["gradient"] = time.perf_counter() - clock
        if fused:
            local = self._local_table(micro, stats)
            table, _ = collectives.all_gather_rows(local)
            local_weights = torch.ones(local.shape[0], dtype=torch.float64)
        total = collectives.all_reduce(torch.tensor([loss_sum, reward_sum], dtype=torch.float64))
        global_weights, _ = collectives.all_gather_rows(local_weights.double().unsqueeze(-1))
        metrics = self._metrics(float(total[0]), table, global_weights[:, 0] != 0, totals)
        groups = self._group_metrics(micro, table, global_weights[:, 0] != 0) if batch.group is not None else {}
        return dataclasses.replace(metrics, peak_memory_bytes=_peak_memory_bytes(), phase_seconds=phases,
                                   reward_loss=float(total[1]) if reward is not None else None, groups=groups)

    def _reward_coef(self, batch: TrainBatch) -> float | None:
        """``loss.reward.coef`` when the reward term is on (None when off); a batch whose
        ``advantages`` disagree with ``loss.reward.enabled`` is refused."""
        enabled = self.loss_cfg.reward.enabled
        if enabled != (batch.advantages is not None):
            raise ValueError("loss.reward.enabled=true but the batch carries no advantages" if enabled else
                             "the batch carries advantages but loss.reward.enabled=false")
        return self.loss_cfg.reward.coef if enabled else None

    @staticmethod
    def _skipped_metrics(micro: list[TrainBatch]) -> StepMetrics:
        valid = collectives.all_reduce(torch.tensor([float(sum(int(mb.loss_mask.sum()) for mb in micro))],
                                                    dtype=torch.float64))
        nan = float("nan")
        return StepMetrics(loss=nan, kept_tokens=0, valid_tokens=int(valid), kept_fraction=0.0, quadrant_shares={},
                           entropy_mean=nan, entropy_kept_mean=nan, rkl_mean=nan, rkl_kept_mean=nan,
                           peak_memory_bytes=_peak_memory_bytes(), skipped=True)

    @staticmethod
    def _metrics(loss: float, table: torch.Tensor, kept_mask: torch.Tensor, totals: torch.Tensor) -> StepMetrics:
        entropy = table[:, STAT_NAMES.index("entropy")]
        rkl = table[:, STAT_NAMES.index("rkl")]
        flat_stats = _table_stats(table)

        def mean(x: torch.Tensor) -> float:
            return float(x.mean()) if x.numel() else 0.0

        valid, kept = int(totals[1]), int(totals[2])
        return StepMetrics(loss=loss, kept_tokens=kept, valid_tokens=valid, kept_fraction=kept / max(1, valid),
                           quadrant_shares=quadrants(flat_stats).shares, entropy_mean=mean(entropy),
                           entropy_kept_mean=mean(entropy[kept_mask]), rkl_mean=mean(rkl),
                           rkl_kept_mean=mean(rkl[kept_mask]))

    def _group_metrics(self, micro: list[TrainBatch], table: torch.Tensor,
                       kept_mask: torch.Tensor) -> dict[int, dict[str, float]]:
        """Each group's tokens' kept fraction, mean and kept-token reverse KL and entropy, and
        quadrant shares (of the batch's quadrants: split at the whole batch's medians, so the
        groups' shares compare), a collective: the global statistics table [m, D] carries each
        token's sequence row (the rank's micro-batches in order, ranks in order), whose group
        every rank gathers; ``kept_mask`` [m] bool in table order."""
        local = torch.cat([mb.group for mb in micro]).cpu().double().unsqueeze(-1)
        groups = collectives.all_gather_rows(local)[0][:, 0].long()
        token_groups = groups[table[:, len(STAT_NAMES) + 1].long()]
        labels = quadrants(_table_stats(table)).labels[0]
        rkl, entropy = table[:, STAT_NAMES.index("rkl")], table[:, STAT_NAMES.index("entropy")]
        out = {}
        for g in groups.unique().tolist():
            mine = token_groups == g
            kept = mine & kept_mask
            valid, n_kept = int(mine.sum()), int(kept.sum())
            out[int(g)] = {"kept_fraction": n_kept / max(1, valid), "kept_tokens": n_kept, "valid_tokens": valid,
                           "rkl_mean": float(rkl[mine].mean()) if valid else 0.0,
                           "rkl_kept_mean": float(rkl[kept].mean()) if n_kept else 0.0,
                           "entropy_mean": float(entropy[mine].mean()) if valid else 0.0,
                           **{f"quadrant/Q{q}": float((labels[mine] == q).double().mean()) if valid else 0.0
                              for q in range(1, 5)}}
        return out

    @torch.no_grad()
    def evaluate_tokens(self, batch: TrainBatch) -> torch.Tensor:
        """Reverse KL(P_S || P_T) of the current weights at every response position of ``batch``:
        float64 [m] on the CPU, in row-major order over ``batch.loss_mask`` (m = its True count).

        The statistics pass of training (``token_stats_from_hidden``: exact with the full teacher
        distribution, top-K + tail otherwise) on ``learner.micro_batch_size`` rows at a time,
        without gradient; no selection, no optimizer state, the step count unchanged. ``batch``
        may hold any number of rows, none included; every rank must call it: ranks with fewer
        micro-batches run an idle forward for each one they lack, so that every rank joins every
        ZeRO-3 gather. Bad input on any rank raises ``ValueError`` on every rank.
        """
        batch = self.place(batch)
        size = self.cfg.micro_batch_size
        micro = [batch.rows(start, start + size) for start in range(0, batch.size, size)]
        rounds = int(collectives.max_over_ranks(float(len(micro))))
        idle = to_device(torch.zeros((1, 2), dtype=torch.long), self.device)
        values, error = [], None
        for i in range(rounds):
            mb = micro[i] if i < len(micro) else None
            hidden = self._hidden(mb) if mb is not None else self.engine(input_ids=idle,
                                                                         attention_mask=torch.ones_like(idle))
            with self._lm_head() as (weight, bias):
                if mb is None or error is not None:
                    continue
                try:
                    stats = token_stats_from_hidden(hidden, weight, mb.teacher, mb.targets, mb.loss_mask,
                                                    lm_head_bias=bias, ta_k=self.cfg.ta_k,
                                                    chunk_rows=self.cfg.chunk_rows,
                                                    vocab_chunk=self.cfg.vocab_chunk)
                except ValueError as exc:  # bad input on this rank: every rank must hear of it
                    error = str(exc)
                    continue
                values.append(stats.rkl[mb.loss_mask].double().cpu())
        if not collectives.all_ranks_agree(error is None):
            raise ValueError(f"learner rank {dist.get_rank()}: " + (error or "another rank rejected its batch"))
        return torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)

    def train_step(self, batch: TrainBatch) -> tuple[StepMetrics, dict[str, float] | None]:
        """``forward_backward`` then ``optim_step`` (one call per rank and step); the optimizer
        report is None when the ranks skipped the step together."""
        metrics = self.forward_backward(batch)
        if metrics.skipped:
            return metrics, None
        clock = time.perf_counter()
        report = self.optim_step()
        metrics.phase_seconds["optimizer"] = time.perf_counter() - clock
        return metrics, report

    def optim_step(self) -> dict[str, float]:
        """Apply the accumulated gradient (clipping, optimizer, schedule); returns the lr this update
        used and the grad norm."""
        lr = float(self.engine.get_lr()[0])  # engine.step() advances the schedule to the next update's
        # Before the step, which clips and then zeroes the gradients (all-reduced by the last
        # micro-batch's backward): the norm before clipping, as DeepSpeed's optimizers report it.
        norm = self._gradient_norm() if self._measures_grad_norm else None
        self.engine.step()
        self.steps += 1
        if not self._measures_grad_norm:
            norm = self.engine.get_global_grad_norm()
        return {"lr": lr, "grad_norm": float(norm) if norm is not None else float("nan"),
                "weights_finite": float(self.weights_finite())}

    @torch.no_grad()
    def _gradient_norm(self) -> float:
        """The 2-norm of the accumulated gradients of every parameter (the same on every rank:
        they are all-reduced)."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads, foreach=True)) if grads else 0.0

    @torch.no_grad()
    def weights_finite(self) -> bool:
        """Whether every weight (this rank's ZeRO-3 partition, or the full copy) is finite, on all ranks."""
        local = [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in self.engine.module.parameters()]
        # A tensor's min and max are NaN or inf exactly when some entry is (they cannot overflow,
        # unlike a sum), and the reduction allocates no [numel] mask per tensor as isfinite does.
        # aminmax, not an inf-norm: on one CPU thread the 64M-parameter SmolLM2 student takes
        # 0.014 s against 0.19 s a step (vector_norm(ord=inf) is not vectorised there).
        bounds = [torch.stack(torch.aminmax(t.detach())).float() for t in local if t.numel()]
        ok = not bounds or bool(torch.isfinite(torch.cat(bounds)).all())
        return collectives.all_ranks_agree(ok)

    def save_state(self, directory: str) -> None:
        """Write the full training state (DeepSpeed: ZeRO shards, optimizer, schedule; this rank's
        RNG) under ``directory``; every rank calls it. Refuses non-finite weights."""
        from safetensors.torch import save_file

        if not self.weights_finite():
            raise NonFiniteWeightsError(f"the learner's weights hold NaN/inf at step {self.steps}: not saving them")
        # A LoRA student's frozen base is learner.model itself: the checkpoint holds the adapters.
        self.engine.save_checkpoint(directory, tag="deepspeed", client_state={"learner_steps": self.steps},
                                    save_latest=False, exclude_frozen_parameters=self.lora)
        save_file({"torch": torch.get_rng_state()}, f"{directory}/rng_rank{dist.get_rank()}.safetensors")
        collectives.barrier()

    def load_state(self, directory: str) -> int:
        """Restore what ``save_state`` wrote (same world size and ZeRO stage); returns the step count."""
        from safetensors.torch import load_file

        # A LoRA checkpoint lacks the frozen base (kept as loaded from learner.model): not strict.
        path, client = self.engine.load_checkpoint(directory, tag="deepspeed", load_optimizer_states=True,
                                                   load_lr_scheduler_states=True, load_module_strict=not self.lora)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed state under {directory}")
        self.steps = int(client["learner_steps"])
        torch.set_rng_state(load_file(f"{directory}/rng_rank{dist.get_rank()}.safetensors")["torch"])
        return self.steps

    def export_hf(self, directory: str) -> None:
        """Write the student as a Hugging Face checkpoint (safetensors + config) to ``directory``;
        every rank calls it (ZeRO-3 gathers), rank 0 writes. A LoRA student writes its adapter in
        peft's format to ``directory/adapter`` and, with ``learner.lora.export_merged``, the merged
        model to ``directory``."""
        if not self.weights_finite():
            raise NonFiniteWeightsError(f"the learner's weights hold NaN/inf at step {self.steps}: not exporting")
        if self.lora:
            adapter = adapter_parameters(self.engine.module.lm)
            with self._gathered(list(adapter.values())):
                tensors = {n: p.detach().cpu().clone() for n, p in adapter.items()} if dist.get_rank() == 0 else {}
            if dist.get_rank() == 0:
                save_adapter(self.engine.module.peft_model, f"{directory}/adapter", tensors)
        weights = self.export_weights() if not self.lora or self.cfg.lora.export_merged else {}
        if dist.get_rank() == 0 and weights:
            self.engine.module.lm.save_pretrained(directory, state_dict=weights, safe_serialization=True)
        collectives.barrier()

    @torch.no_grad()
    def export_weights(self, all_ranks: bool = False) -> dict[str, torch.Tensor]:
        """The full student state dict on CPU, Hugging Face names; every rank must call it
        (ZeRO-3 gathers the shards collectively). Empty on ranks other than 0 unless ``all_ranks``.
        A LoRA student's: the served tensors (``tip_ray.learner.lora.served_tensors``: base weights
        merged with their adapters, under the base model's names)."""
        module = self.engine.module.lm
        keep = all_ranks or dist.get_rank() == 0
        if self.cfg.zero_stage != 3 and not self.lora:
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if keep else {}
        out = {}
        for tensor in self._served:
            with self._gathered(tensor.params):
                if keep:
                    out[tensor.name] = tensor.value().cpu().clone()
        return out

    # Collective weight sync (tip_ray.sync.transports): rank 0 sends, every rank joins the ZeRO-3 gathers.

    def weight_metadata(self) -> list[TensorMeta]:
        """Name (Hugging Face), full shape and dtype of every parameter, in the order
        ``broadcast_weights`` sends them."""
        return [TensorMeta(t.name, t.shape, dtype_name(t.param.dtype)) for t in self._served]

    def host_weight_group(self, host: str, backend: str, timeout_s: float) -> tuple[int, str]:
        """Rank 0: host the weight group's store at ``host``; returns (port, backend), ``auto``
        resolved to ``nccl`` or ``gloo`` by whether this rank has CUDA."""
        from tip_ray.sync.process_group import host_store, resolve_backend

        if dist.get_rank() != 0:
            raise RuntimeError(f"learner rank 0 hosts the weight group, not rank {dist.get_rank()}")
        backend = resolve_backend(backend, torch.cuda.is_available())
        self.close_weight_group()
        self._weight_store, port = host_store(host, timeout_s)
        return port, backend

    def join_weight_group(self, plan: tuple[Bucket, ...], world_size: int, backend: str, timeout_s: float) -> None:
        """Every rank keeps the bucket ``plan``; rank 0 joins the weight group hosted by
        ``host_weight_group`` as its sender (blocks until all ``world_size`` members joined)."""
        from tip_ray.sync.process_group import WeightGroup

        self._weight_plan = tuple(plan)
        if dist.get_rank() == 0:
            store = getattr(self, "_weight_store", None)
            if store is None:
                raise RuntimeError("call host_weight_group on learner rank 0 before join_weight_group")
            self._weight_group = WeightGroup(plan, 0, world_size, backend, timeout_s, store=store)

    @torch.no_grad()
    def broadcast_weights(self) -> int:
        """Send the current weights to the weight group, bucket by bucket; every rank calls it
        (ZeRO-3 gathers each bucket's shards collectively). Returns the bytes rank 0 sent (0 on
        the other ranks)."""
        plan = getattr(self, "_weight_plan", None)
        if plan is None:
            raise RuntimeError("join_weight_group must run before broadcast_weights")
        group = getattr(self, "_weight_group", None)
        served = {t.name: t for t in self._served}
        sent = 0
        for bucket in plan:
            tensors = [served[name] for name in bucket.names]
            with self._gathered([p for t in tensors for p in t.params]):
                if group is not None:
                    sent += group.send_bucket(bucket, {t.name: t.value() for t in tensors})
        return sent

    def _gathered(self, params: list[torch.nn.Parameter]):
        """Full parameters inside the context: a ZeRO-3 gather (collective), else nothing to do."""
        if self.cfg.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def close_weight_group(self) -> None:
        """Leave the weight group and drop the store this rank hosts (if any)."""
        group = getattr(self, "_weight_group", None)
        if group is not None:
            group.close()
        self._weight_group = self._weight_store = None

    def close(self) -> None:
        """Leave the process group cleanly (every rank together); the worker is unusable after."""
        if dist.is_initialized():
            collectives.barrier()
            dist.destroy_process_group()
