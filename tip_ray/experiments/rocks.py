"""``tip-ray rocks``: sample student rollouts on the training prompts and write the rock set.

It composes the training config (``tip_ray/conf/train.yaml`` plus overrides), so the rock set is built
with the same student, teacher, prompts and sampling settings that ``tip-ray train`` uses. The
engines run in this process: the rollout engine of ``rollout.engine`` (``RolloutWorker``), the
teacher scorer (``TeacherWorker``) and the student's statistics from its final hidden states
(the learner's chunked ``token_stats_from_hidden``, so no [tokens x vocab] tensor is kept).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from tip_ray.config import TrainConfig
from tip_ray.tip.rocks import RockSet, rock_set_from_table, save_rock_set, token_divergence_table


@dataclass(frozen=True)
class DivergenceTable:
    """Per-id counts [V] and summed reverse KL [V] over the sampled response tokens."""

    counts: torch.Tensor
    rkl_sums: torch.Tensor
    num_rollouts: int
    num_prompts: int
    truncated: int


def collect_divergence(cfg: TrainConfig, num_rollouts: int, prompts_per_batch: int = 64) -> DivergenceTable:
    """Sample ``num_rollouts`` student responses on the training prompts (the training stream's
    order, ``rollout.n`` per prompt) and tally each sampled id's count and summed KL(P_S||P_T)."""
    from transformers import AutoModelForCausalLM

    from tip_ray.config import with_student_vocab
    from tip_ray.data.prompts import PromptStream, load_prompt_dataset
    from tip_ray.rollout.vllm_args import sized_for
    from tip_ray.rollout.worker import RolloutWorker
    from tip_ray.state.preflight import check_same_vocabulary, load_tokenizer, require_checkpoint
    from tip_ray.teacher.layout import first_scored_positions
    from tip_ray.teacher.worker import TeacherWorker
    from tip_ray.tip.lean_stats import token_stats_from_hidden
    from tip_ray.types import RolloutBatch, TrainBatch

    if num_rollouts < 1:
        raise ValueError(f"the number of rollouts must be >= 1, got {num_rollouts}")
    require_checkpoint(cfg.student, "student")
    require_checkpoint(cfg.teacher.model, "teacher")
    tokenizer = load_tokenizer(cfg.student, "student")
    check_same_vocabulary(tokenizer, load_tokenizer(cfg.teacher.model, "teacher"), cfg.student, cfg.teacher.model)
    data = load_prompt_dataset(cfg.data, tokenizer)
    stream = PromptStream(data, min(prompts_per_batch, len(data)), seed=cfg.data.seed, shuffle=cfg.data.shuffle,
                          drop_last=False)

    per_call = min(prompts_per_batch, len(data)) * cfg.rollout.n  # what one generate / score call holds
    rollout = RolloutWorker(sized_for(cfg.rollout, per_call), cfg.student)
    student = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=torch.float32).eval()
    vocab = int(student.config.vocab_size)
    # As in training: the teacher's top-K over the student's ids only.
    teacher = TeacherWorker(sized_for(with_student_vocab(cfg, vocab).teacher, per_call))
    head = student.get_output_embeddings()
    counts = torch.zeros(vocab, dtype=torch.long)
    sums = torch.zeros(vocab, dtype=torch.float64)
    done = prompts = truncated = 0
    while done < num_rollouts:
        wanted = -(-(num_rollouts - done) // cfg.rollout.n)
        batch = next(stream).prompt_ids[:wanted]
        generations = rollout.generate(batch).generations[: num_rollouts - done]
        rollouts = RolloutBatch(tuple(tuple(p) for p in batch), tuple(generations), 0)
        input_ids, attention, loss_mask = rollouts.to_sequences(tokenizer.pad_token_id)
        train = TrainBatch(input_ids, attention, loss_mask, teacher.score(input_ids, attention, first_scored_positions(loss_mask)))
        step = cfg.learner.micro_batch_size
        with torch.no_grad():
            for start in range(0, train.size, step):
                mb = train.rows(start, start + step)
                hidden = student.get_decoder()(input_ids=mb.input_ids, attention_mask=mb.attention_mask)
                stats = token_stats_from_hidden(
                    hidden.last_hidden_state[:, :-1].float(), head.weight.float(), mb.teacher, mb.targets,
                    mb.loss_mask, lm_head_bias=getattr(head, "bias", None), ta_k=cfg.learner.ta_k,
                    chunk_rows=cfg.learner.chunk_rows)
                c, s = token_divergence_table(stats.token_ids, stats.rkl, stats.mask, vocab)
                counts += c
                sums += s
        done += len(generations)
        prompts += len(batch)
        truncated += sum(g.finish_reason == "length" for g in generations)
        print(f"rocks: {done}/{num_rollouts} rollouts scored", flush=True)
    return DivergenceTable(counts, sums, done, prompts, truncated)


def build_rocks(
    cfg: TrainConfig, out: str | Path, num_rollouts: int, num_rocks: int, drop_most_frequent: int
) -> RockSet:
    """Collect the divergence table, rank the rocks, save them to ``out`` with provenance."""
    import tip_ray

    started = time.perf_counter()
    table = collect_divergence(cfg, num_rollouts)
    provenance = {
        "student": str(Path(cfg.student).resolve()) if Path(cfg.student).exists() else cfg.student,
        "teacher": str(Path(cfg.teacher.model).resolve()) if Path(cfg.teacher.model).exists() else cfg.teacher.model,
        "data": cfg.data.path,
        "num_rollouts": table.num_rollouts,
        "num_prompts": table.num_prompts,
        "truncated_rollouts": table.truncated,
        "engine": cfg.rollout.engine,
        "temperature": cfg.rollout.temperature,
        "top_p": cfg.rollout.top_p,
        "max_new_tokens": cfg.rollout.max_new_tokens,
        "rollout_seed": cfg.rollout.seed,
        "data_seed": cfg.data.seed,
        "teacher_top_k": cfg.teacher.top_k,
        "vocab_size": int(table.counts.numel()),
        "distinct_ids_seen": int((table.counts > 0).sum()),
        "mean_rkl_all": float(table.rkl_sums.sum() / max(1, int(table.counts.sum()))),
        "tip_ray_version": tip_ray.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    rocks = rock_set_from_table(table.counts, table.rkl_sums, num_rocks=num_rocks,
                                drop_most_frequent=drop_most_frequent, provenance=provenance)
    save_rock_set(rocks, out)
    return rocks


def describe(rocks: RockSet, decode) -> str:
    """A short text summary: how many rocks, their share of the tokens and of the divergence,
    and the top ones decoded with ``decode(list[int]) -> str``."""
    seen = rocks.provenance.get("distinct_ids_seen")
    token_share = sum(rocks.frequency)
    mean_all = float(rocks.provenance.get("mean_rkl_all") or 0.0)
    rkl_share = sum(rocks.scores) / mean_all if mean_all > 0 else float("nan")
    lines = [f"{len(rocks.token_ids)} rocks (of {seen} distinct ids seen; dropped the {len(rocks.dropped_ids)} most "
             f"frequent: {[decode([v]) for v in rocks.dropped_ids]}) from {rocks.num_tokens} tokens of "
             f"{rocks.provenance.get('num_rollouts')} rollouts",
             f"rocks are {100 * token_share:.1f}% of the sampled tokens and carry {100 * rkl_share:.1f}% of their "
             "summed reverse KL"]
    if seen and len(rocks.token_ids) > seen / 4:
        lines.append(f"warning: the rocks are more than a quarter of the ids seen ({len(rocks.token_ids)} of {seen}); "
                     "with a small vocabulary lower --num-rocks")
    for v, r, f, m in list(zip(rocks.token_ids, rocks.scores, rocks.frequency, rocks.mean_rkl))[:10]:
        lines.append(f"  id {v:>6} {decode([v])!r:>12}  R {r:.4f}  frequency {f:.4f}  mean rkl {m:.4f}")
    return "\n".join(lines)

