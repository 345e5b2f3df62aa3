"""The rollout and teacher pools: actors on a placement group, work balanced by sequence length,
and bounded recovery from actors that die or hang.

Each pool reserves one placement group and starts one actor per bundle with
``max_restarts=faults.max_actor_restarts`` and ``max_task_retries=0``: Ray restarts an actor that
died but never re-runs a call by itself, so no call is half-applied silently. The driver
retries instead: a shard whose actor died, or that did not answer within
``faults.actor_timeout_s`` (the actor is then killed so that Ray restarts it), is sent again to
the restarted actor, or to another live actor when that one is gone for good; at most
``faults.max_step_retries`` times per pool call, each retry reported through ``on_event``.
Past that bound a ``PoolError`` names the pool, the actor and the cause.

Work is split longest-processing-time-first over the live actors (by sequence length) and
joined back in the original order. Rollouts sample every prompt with its own seed
(``sample_seeds``: from the prompt's place in the prompt stream), so with vLLM the samples
depend neither on the number of rollout actors nor on a restart of the run.

A restarted rollout actor comes back with the initial checkpoint's weights (version 0). The
pool re-sends the served weights (``served_weights``) before it serves again, and checks every
shard's policy version against the version served when the call started, which also catches
a restart that no call saw (an actor killed while idle).
"""

from __future__ import annotations

import hashlib
import heapq
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import ray
import torch

from tip_ray.config import FaultConfig, RolloutConfig, TeacherConfig
from tip_ray.runtime.actors import RolloutActor, TeacherActor
from tip_ray.runtime.placement import PoolResources, on_bundle, reserve
from tip_ray.teacher.layout import fill_padding
from tip_ray.tip.signal import TeacherSignal
from tip_ray.types import Generation, RolloutBatch, SamplingSettings

if TYPE_CHECKING:
    from tip_ray.runtime.stored_signal import StoredSignal

# What a dead, restarting or unreachable actor raises (ActorDiedError, ActorUnavailableError).
ACTOR_FAILURES = (ray.exceptions.RayActorError,)


class PoolError(RuntimeError):
    """A pool call failed more often than ``faults.max_step_retries`` allows, or no actor is left."""


# ---------------------------------------------------------------------------------------------
# Pure functions: seeds, balancing, re-assembly (no Ray needed).


def sample_seeds(base: int, epoch: int, start: int, count: int) -> list[int]:
    """One sampling seed per prompt, ``[count]``: the prompt at position ``start + i`` of epoch
    ``epoch`` of the prompt stream gets a 31-bit seed that depends on ``(base, epoch, start + i)``
    only, so the same prompt of the same step gets the same seed in a resumed run."""
    seeds = []
    for i in range(count):
        digest = hashlib.blake2b(f"{base}/{epoch}/{start + i}".encode(), digest_size=8).digest()
        seeds.append(int.from_bytes(digest, "little") & 0x7FFF_FFFF)
    return seeds


def balance(costs: Sequence[float], parts: int) -> list[list[int]]:
    """Split the indices ``range(len(costs))`` into ``parts`` shards of nearly equal total cost.

    Longest processing time first: items in decreasing cost go to the lightest shard so far (ties:
    lower index first, lower shard first), so the heaviest shard exceeds the lightest by at most
    the largest single cost. Returns ``parts`` lists of indices, each increasing; some are empty
    when there are fewer items than parts.
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if any(not math.isfinite(c) or c < 0 for c in costs):
        raise ValueError(f"costs must be finite and >= 0, got {list(costs)}")
    loads = [(0.0, j) for j in range(parts)]
    shards: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, j = heapq.heappop(loads)
        shards[j].append(i)
        heapq.heappush(loads, (load + costs[i], j))
    return [sorted(s) for s in shards]


def sequence_lengths(attention_mask: torch.Tensor) -> list[int]:
    """Per row of ``attention_mask`` [B, L]: one past its last attended position, ``[B]`` (0 if none)."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [B, L], got shape {tuple(attention_mask.shape)}")
    if attention_mask.shape[1] == 0:
        return [0] * attention_mask.shape[0]
    positions = torch.arange(1, attention_mask.shape[1] + 1)
    return (attention_mask.bool() * positions).amax(dim=1).tolist()


def take_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor,
              rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``rows`` of ``input_ids``/``attention_mask`` [B, L], cut to the longest of them:
    two tensors [len(rows), W] with W = max(2, longest sequence), at most L."""
    index = torch.tensor(list(rows), dtype=torch.long)
    ids, mask = input_ids.index_select(0, index), attention_mask.index_select(0, index)
    width = min(input_ids.shape[1], max(2, *sequence_lengths(mask)))
    return ids[:, :width].contiguous(), mask[:, :width].contiguous()


def check_row_cover(rows_per_part: Sequence[Sequence[int]], total: int) -> None:
    """``ValueError`` unless the parts' rows hold each of ``range(total)`` exactly once."""
    seen = sorted(i for rows in rows_per_part for i in rows)
    if seen != list(range(total)):
        raise ValueError(f"the shards cover rows {seen}, not each of range({total}) exactly once")


def join_signals(parts: Sequence[tuple[Sequence[int], TeacherSignal]], total: int, length: int,
                 vocab_size: int) -> TeacherSignal:
    """Shard signals back in the original row order: part j holds rows ``rows_j`` as [b_j, W_j - 1, K];
    the result is [total, length - 1, K]. Positions past a part's width are padding (no response
    token there); they hold the padding placeholder of a teacher over ``vocab_size`` ids
    (``tip_ray.teacher.layout``: ids 0..K-1, each at -log V), finite and never read. One shard
    holding every row in order at the full width (one teacher actor) is the result as it is: no
    [total, length - 1, K] copy (hundreds of MB a step for a full distribution), read-only when it
    came through Ray's object store, as every received signal is (``tip_ray.tip.signal``)."""
    if not parts:
        raise ValueError("no teacher shards to join")
    check_row_cover([rows for rows, _ in parts], total)
    first = parts[0][1]
    k, dtype = first.k, first.topk_logprobs.dtype
    positions = length - 1
    if (len(parts) == 1 and list(parts[0][0]) == list(range(total))
            and tuple(first.topk_logprobs.shape[:2]) == (total, positions)
            and tuple(first.sampled_logprobs.shape) == (total, positions)):
        return first
    dense = first.dense
    if any(signal.dense != dense for _, signal in parts):
        raise ValueError("the teacher shards mix dense and top-K signals: every teacher actor of a pool scores "
                         "with the same settings")
    ids = None if dense else torch.empty((total, positions, k), dtype=first.topk_ids.dtype)
    logprobs = torch.empty((total, positions, k), dtype=dtype)
    sampled = torch.empty((total, positions), dtype=first.sampled_logprobs.dtype)
    fill_padding(ids, logprobs, sampled, torch.zeros(total, positions, dtype=torch.bool), vocab_size)
    for rows, signal in parts:
        index = torch.tensor(list(rows), dtype=torch.long)
        width = signal.topk_logprobs.shape[1]
        if signal.k != k or width > positions or signal.topk_logprobs.shape[0] != len(rows):
            raise ValueError(f"a teacher shard of shape {tuple(signal.topk_logprobs.shape)} does not fit "
                             f"{len(rows)} rows x at most {positions} positions x K={k}")
        if ids is not None:
            ids[index, :width] = signal.topk_ids
        logprobs[index, :width] = signal.topk_logprobs
        sampled[index, :width] = signal.sampled_logprobs
    return TeacherSignal(ids, logprobs, sampled)


def join_rollouts(parts: Sequence[tuple[Sequence[int], RolloutBatch]], total: int) -> RolloutBatch:
    """Shard batches back in the original prompt order: part j sampled prompts ``rows_j`` (its
    ``prompt_ids`` in that order). The result covers prompts ``range(total)``, each prompt's
    generations in their sampled order with ``prompt_index`` re-based, stamped with the oldest
    policy version among the parts."""
    if not parts:
        raise ValueError("no rollout shards to join")
    check_row_cover([rows for rows, _ in parts], total)
    prompts: list[tuple[int, ...]] = [()] * total
    per_prompt: list[list[Generation]] = [[] for _ in range(total)]
    for rows, batch in parts:
        if len(batch.prompt_ids) != len(rows):
            raise ValueError(f"a rollout shard holds {len(batch.prompt_ids)} prompts for {len(rows)} rows")
        for local, row in enumerate(rows):
            prompts[row] = batch.prompt_ids[local]
        for g in batch.generations:
            per_prompt[rows[g.prompt_index]].append(replace(g, prompt_index=rows[g.prompt_index]))
    generations = tuple(g for gens in per_prompt for g in gens)
    return RolloutBatch(tuple(prompts), generations, min(batch.policy_version for _, batch in parts))


# ---------------------------------------------------------------------------------------------
# The fault-tolerant fan-out.


@dataclass
class _Shard:
    rows: list[int]
    args: tuple  # object refs of the call's arguments, put once, reused by retries
    actor: int
    ref: Any = None
    prepare: Any = None  # ref of the weight re-send that precedes the call on a restarted actor
    deadline: float = 0.0
    result: Any = None
    done: bool = False


@dataclass
class PoolCall:
    """A call fanned out over a pool by ``ActorPool.start``; ``ActorPool.finish`` waits for it."""

    shards: list[_Shard]
    call: Callable[..., Any]
    check: Callable[[Any], str | None] | None = None


class ActorPool:
    """One actor of ``actor_cls`` per bundle of a placement group, with balanced fan-out and
    bounded retries (see the module docstring). ``actors`` are the handles (stable across
    restarts); ``retired`` the indices of actors gone for good."""

    def __init__(
        self,
        resources: PoolResources,
        actor_cls: type,
        actor_args: Callable[[int], tuple],
        faults: FaultConfig,
        on_event: Callable[[str], None] | None = None,
        placement_timeout_s: float = 60.0,
    ) -> None:
        self.name = resources.name
        self.faults = faults
        self.on_event = on_event or (lambda message: None)
        self.group = reserve(resources, placement_timeout_s)
        remote = ray.remote(actor_cls)
        self.actors = [
            remote.options(num_cpus=resources.cpus, num_gpus=resources.gpus, resources=resources.custom or None,
                           scheduling_strategy=on_bundle(self.group, i), max_restarts=faults.max_actor_restarts,
                           max_task_retries=0).remote(*actor_args(i))
            for i in range(resources.num_actors)
        ]
        self.retired: set[int] = set()
        self._restarted: set[int] = set()  # restarted since they last got a call: prepare them first
        self.restarts = 0  # actor restarts so far (a collective weight group must be formed again after one)
        # Readiness is awaited at the first call, not here, so that the pools start side by side,
        # and before any call's clock starts, so that loading a model never counts as a hang.
        self._ready = [actor.__ray_ready__.remote() for actor in self.actors]
        self._up = [False] * len(self.actors)

    @property
    def live(self) -> list[int]:
        """Indices of the actors not gone for good."""
        return [i for i in range(len(self.actors)) if i not in self.retired]

    @property
    def live_actors(self) -> list:
        """Handles of the actors not gone for good (what a weight sync should send to)."""
        return [self.actors[i] for i in self.live]

    def start(
        self,
        costs: Sequence[float],
        payload: Callable[[list[int]], tuple],
        call: Callable[..., Any],
        check: Callable[[Any], str | None] | None = None,
    ) -> PoolCall:
        """Split items with ``costs`` [N] over the live actors (``balance``) and send each shard
        without waiting: ``call(actor, *refs)``, where refs are the shard's ``payload(rows)`` put
        in the object store once. ``check(result)`` says why a result is unusable (it is then
        retried like a failure), or None."""
        live = self.live
        if not live:
            raise PoolError(f"{self.name} pool: no live actor left")
        self._wait_up(live)
        shards = [_Shard(rows, tuple(ray.put(x) for x in payload(rows)), live[j])
                  for j, rows in enumerate(balance(costs, len(live))) if rows]
        pending = PoolCall(shards, call, check)
        for shard in shards:
            self._send(pending, shard)
        return pending

    def finish(self, pending: PoolCall) -> list[tuple[list[int], Any]]:
        """Wait for every shard of ``pending``, retrying the failed ones; ``(rows, result)`` per shard.

        Calling it again on a finished call returns the same results without waiting."""
        retries, bound = 0, self.faults.max_step_retries
        waiting = {s.ref: s for s in pending.shards if not s.done}
        while waiting:
            # Results already in first: a shard that finished is never expired, however late we look.
            ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=0)
            for ref in ready:
                waiting[ref].deadline = math.inf
            now = time.monotonic()
            expired = [s for s in waiting.values() if s.deadline <= now]
            if expired:
                shard = min(expired, key=lambda s: s.deadline)
                del waiting[shard.ref]
                ray.kill(self.actors[shard.actor], no_restart=False)
                problem = (f"did not answer within faults.actor_timeout_s={self.faults.actor_timeout_s:g} s "
                           "(killed so that Ray restarts it)")
            else:
                first = min(s.deadline for s in waiting.values())
                timeout = None if math.isinf(first) else first - now
                ready, _ = ray.wait(list(waiting), num_returns=1, timeout=timeout)
                if not ready:
                    continue
                shard = waiting.pop(ready[0])
                problem = self._outcome(pending, shard)
                if problem is None:
                    continue
            retries += 1
            if retries > bound:
                raise PoolError(f"{self.name} pool: actor {shard.actor} {problem}; the call's retries are used up "
                                f"(faults.max_step_retries={bound})")
            failed = shard.actor
            shard.actor = self._replacement(failed, problem)
            where = "restarted" if shard.actor == failed else f"moved to actor {shard.actor}"
            self.on_event(f"{self.name} pool: actor {failed} {problem}; {where}, retry {retries}/{bound}")
            self._send(pending, shard)
            waiting[shard.ref] = shard
        return [(s.rows, s.result) for s in pending.shards]

    def revive(self, problem: str) -> None:
        """After a call made outside ``start``/``finish`` failed (a weight sync): every live actor
        that no longer answers is waited for (restarted: prepared again before its next call, as
        after a failed shard) or retired; ``PoolError`` when none is left. ``problem`` says what
        failed, for the events."""
        for index in self.live:
            try:
                ray.get(self.actors[index].__ray_ready__.remote(), timeout=self.faults.actor_timeout_s)
                continue
            except ray.exceptions.GetTimeoutError:
                continue  # alive but busy
            except ACTOR_FAILURES:
                pass
            if self._replacement(index, problem) == index:
                self.on_event(f"{self.name} pool: actor {index} {problem}; restarted")

    def close(self) -> None:
        """Stop the actors and release the placement group."""
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.group)

    # -- hooks ----------------------------------------------------------------------------------

    def _prepare(self, actor) -> Any:
        """Submit what a restarted actor needs before its next call (an object ref), or None."""
        return None

    # -- internals ------------------------------------------------------------------------------

    def _wait_up(self, indices: list[int]) -> None:
        """Wait until the actors ``indices`` are built (the first time only); a failed constructor
        raises its error here."""
        waiting = [i for i in indices if not self._up[i]]
        if not waiting:
            return
        try:
            ray.get([self._ready[i] for i in waiting], timeout=self.faults.restart_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise PoolError(f"{self.name} pool: actors {waiting} were not up within faults.restart_timeout_s="
                            f"{self.faults.restart_timeout_s:g} s") from None
        for i in waiting:
            self._up[i] = True

    def _send(self, pending: PoolCall, shard: _Shard) -> None:
        actor = self.actors[shard.actor]
        # An actor runs its calls in submission order, so the preparation lands before the call.
        shard.prepare = self._prepare(actor) if shard.actor in self._restarted else None
        self._restarted.discard(shard.actor)
        shard.ref = pending.call(actor, *shard.args)
        shard.deadline = time.monotonic() + self.faults.actor_timeout_s

    def _outcome(self, pending: PoolCall, shard: _Shard) -> str | None:
        """Why the answered ``shard`` must be retried, or None (its result is then stored)."""
        try:
            result = ray.get(shard.ref)
        except ACTOR_FAILURES as exc:
            if exc.actor_init_failed:
                raise  # the actor cannot be built (bad model path, config): retrying cannot help
            return f"failed ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        problem = pending.check(result) if pending.check is not None else None
        if shard.prepare is not None:
            try:
                ray.get(shard.prepare)
            except ray.exceptions.RayTaskError as exc:
                # Harmless when the actor already had these weights (a sync reached it first): the
                # check above decides; otherwise this is the cause worth reporting.
                if problem is not None:
                    problem += f" (re-sending the weights failed: {str(exc).splitlines()[0]})"
        if problem is None:
            shard.result, shard.done = result, True
        return problem

    def _replacement(self, failed: int, problem: str) -> int:
        """The actor to retry on: ``failed`` once Ray restarted it, else another live actor."""
        if self._wait_alive(failed):
            self._restarted.add(failed)
            self.restarts += 1
            return failed
        self.retired.add(failed)
        self.on_event(f"{self.name} pool: actor {failed} is gone for good (restarts used up, or not back within "
                      f"faults.restart_timeout_s={self.faults.restart_timeout_s:g} s); its work moves to the other "
                      "actors")
        live = self.live
        if not live:
            raise PoolError(f"{self.name} pool: every actor is gone (faults.max_actor_restarts="
                            f"{self.faults.max_actor_restarts} each); the last one, actor {failed}, {problem}")
        return live[failed % len(live)]

    def _wait_alive(self, index: int) -> bool:
        """Block until actor ``index`` is up again (True) or known dead for good (False)."""
        actor = self.actors[index]
        # A call with task retries is held by Ray until a restarting actor is back, and fails
        # with ActorDiedError once the actor cannot restart any more.
        probe = actor.__ray_ready__.options(max_task_retries=-1).remote()
        try:
            ray.get(probe, timeout=self.faults.restart_timeout_s)
            return True
        except ray.exceptions.GetTimeoutError:
            ray.kill(actor, no_restart=True)
            return False
        except ACTOR_FAILURES:
            return False


# ---------------------------------------------------------------------------------------------
# The two pools.


@dataclass(frozen=True)
class RolloutLaunch:
    """A started rollout call (``RolloutPool.launch``): ``size`` prompts, sampled by the actors
    serving ``expected_version`` when it started."""

    call: PoolCall
    size: int
    expected_version: int


class RolloutPool(ActorPool):
    """``rollout.num_workers`` RolloutActors. ``served_weights()`` returns ``(weights_ref, version)``
    of the weights the pool serves, or None while it serves the initial checkpoint; a restarted
    actor gets them again before its next call."""

    def __init__(
        self,
        resources: PoolResources,
        cfg: RolloutConfig,
        model: str,
        faults: FaultConfig,
        served_weights: Callable[[], tuple[Any, int] | None],
        on_event: Callable[[str], None] | None = None,
        placement_timeout_s: float = 60.0,
        served_version: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(resources, RolloutActor, lambda i: (cfg, model, i), faults, on_event, placement_timeout_s)
        self.cfg = cfg
        self.served_weights = served_weights
        # The version alone is cheap; fetching the weights may mean exporting them from the learner.
        self.served_version = served_version or (lambda: (self.served_weights() or (None, 0))[1])

    def launch(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int],
               sampling: SamplingSettings | None = None) -> RolloutLaunch:
        """Start sampling ``rollout.n`` responses per prompt (``prompts`` [N][len_i], ``seeds`` [N],
        one per prompt; ``sampling`` replaces the rollout config's, e.g. one sample per prompt for a
        later turn) on the live actors, balanced by prompt length; does not wait."""
        return self._launch(prompts, seeds, sampling)

    def collect(self, launch: RolloutLaunch) -> RolloutBatch:
        """Wait for ``launch`` (retrying failed shards) and join it in the original prompt order;
        the batch's policy version is the oldest among its shards."""
        return join_rollouts(self.finish(launch.call), launch.size)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingSettings) -> list[Generation]:
        """Generations for ``prompts`` [N][len_i] with ``sampling`` (e.g. greedy, for evaluation)
        from the served weights, prompt by prompt in the original order (``prompt_index`` into
        ``prompts``); waits, with the pool's deadlines and retries (``tip_ray.eval``'s engine)."""
        return list(self.collect(self._launch(prompts, sample_seeds(self.cfg.seed, -1, 0, len(prompts)),
                                              sampling)).generations)

    def _launch(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int],
                sampling: SamplingSettings | None) -> RolloutLaunch:
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
        if not prompts:
            raise ValueError("no prompts to generate from")
        expected = self.served_version()
        budget = (sampling or self.cfg).max_new_tokens
        # A prompt's cost: the sequence length it can reach (decoding dominates generation).
        costs = [len(p) + budget for p in prompts]

        def check(batch: RolloutBatch) -> str | None:
            if batch.policy_version >= expected:
                return None
            return f"served weight version {batch.policy_version} instead of {expected} (it restarted)"

        call = self.start(costs, lambda rows: ([list(prompts[i]) for i in rows], [seeds[i] for i in rows]),
                          lambda actor, ids, row_seeds: actor.generate.remote(ids, row_seeds, sampling), check)
        return RolloutLaunch(call, len(prompts), expected)

    def _prepare(self, actor) -> Any:
        served = self.served_weights()
        if served is None:
            return None  # nothing synced yet: the restarted actor's initial checkpoint is what is served
        weights_ref, version = served
        return actor.update_weights.remote(weights_ref, version)


class TeacherPool(ActorPool):
    """``teacher.num_workers`` TeacherActors scoring rows balanced by their attention length;
    ``vocab_size``: the teacher's vocabulary (the padding placeholder of joined shards)."""

    def __init__(
        self,
        resources: PoolResources,
        cfg: TeacherConfig,
        faults: FaultConfig,
        vocab_size: int,
        on_event: Callable[[str], None] | None = None,
        placement_timeout_s: float = 60.0,
    ) -> None:
        super().__init__(resources, TeacherActor, lambda i: (cfg,), faults, on_event, placement_timeout_s)
        self.vocab_size = vocab_size

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingSettings) -> list[Generation]:
        """The teacher's own generations for ``prompts`` [N][len_i] (to measure its accuracy),
        balanced by prompt length over the live actors; ``prompt_index`` into ``prompts``, in
        prompt order. Waits, with the pool's deadlines and retries, like ``score``."""
        if not prompts:
            raise ValueError("no prompts to generate from")
        call = self.start([float(len(p) + sampling.max_new_tokens) for p in prompts],
                          lambda rows: ([list(prompts[i]) for i in rows],),
                          lambda actor, ids: actor.generate.remote(ids, sampling))
        out = [replace(g, prompt_index=rows[g.prompt_index]) for rows, gens in self.finish(call) for g in gens]
        return sorted(out, key=lambda g: g.prompt_index)

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              first_position: torch.Tensor | None = None) -> TeacherSignal:
        """The teacher's signal [B, L-1, K] for ``input_ids``/``attention_mask`` [B, L]; each
        actor scores its rows cut to their longest sequence; rows come back in the original order.
        ``first_position`` [B]: the first position each row needs (``TeacherWorker.score``)."""
        return self.collect_score(self.launch_score(input_ids, attention_mask, first_position))

    def launch_score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     first_position: torch.Tensor | None = None) -> tuple[PoolCall, int, int]:
        """Start ``score`` without waiting (several teacher pools score at once); ``collect_score``
        waits for it."""
        if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                             "must both be [B, L]")

        def payload(rows: list[int]) -> tuple:
            first = None if first_position is None else first_position[torch.tensor(rows, dtype=torch.long)]
            return (*take_rows(input_ids, attention_mask, rows), first)

        call = self.start(sequence_lengths(attention_mask), payload,
                          lambda actor, ids, mask, first: actor.score.remote(ids, mask, first))
        return call, int(input_ids.shape[0]), int(input_ids.shape[1])

    def collect_score(self, launch: tuple[PoolCall, int, int]) -> TeacherSignal:
        """Wait for a ``launch_score``, with the pool's deadlines and retries: the signal [B, L-1, K]."""
        call, rows, length = launch
        return join_signals(self.finish(call), rows, length, self.vocab_size)

    def score_stored(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     first_position: torch.Tensor | None = None) -> tuple[TeacherSignal, StoredSignal]:
        """``score``, and the same signal as the refs of the actors' results in the object store
        (``StoredSignal``: what the learner ranks read their rows from, in place)."""
        from tip_ray.runtime.stored_signal import StoredSignal

        launch = self.launch_score(input_ids, attention_mask, first_position)
        signal = self.collect_score(launch)
        call, rows, length = launch
        return signal, StoredSignal.of_shards([(s.rows, s.ref) for s in call.shards], rows, length - 1,
                                              self.vocab_size)
