"""Start-up checks on the checkpoints and tokenizers a run is pointed at.

They run in the driver before any worker starts, so a wrong path or a mismatched pair is one
clear message instead of a crash inside an actor.
"""

from __future__ import annotations

from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint or tokenizer that cannot be used as configured."""


def require_checkpoint(path: str, role: str) -> str:
    """Return ``path`` if it is a local Hugging Face checkpoint directory (or a hub name).

    A path that exists, is absolute or starts with '.', or is not of the form ``owner/name``,
    must be a directory with a ``config.json``; an ``owner/name`` that does not exist locally is
    a hub name, which the loader resolves.
    """
    candidate = Path(path).expanduser()
    looks_local = candidate.is_absolute() or path.startswith(".") or candidate.exists() or path.count("/") != 1
    if not looks_local:
        return path
    if not candidate.exists():
        raise CheckpointError(f"{role} checkpoint {path!r} does not exist")
    if not (candidate / "config.json").is_file():
        raise CheckpointError(f"{role} checkpoint {path!r} has no config.json: not a Hugging Face model directory")
    return str(candidate)


def load_tokenizer(path: str, role: str):
    """``AutoTokenizer.from_pretrained(path)`` with a clear error naming the role."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the {role} tokenizer from {path!r}: {exc}") from exc


def check_same_vocabulary(student_tokenizer, teacher_tokenizer, student: str, teacher: str) -> None:
    """Raise ``CheckpointError`` naming both unless the tokenizers map every token to the same id.

    Token-level distillation compares the two models' distributions id by id; a different
    vocabulary makes every statistic meaningless.
    """
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab == teacher_vocab:
        return
    if len(student_vocab) != len(teacher_vocab):
        detail = f"{len(student_vocab)} tokens vs {len(teacher_vocab)}"
    else:
        token = next(t for t in sorted(student_vocab) if teacher_vocab.get(t) != student_vocab[t])
        detail = f"token {token!r} has id {student_vocab[token]} vs {teacher_vocab.get(token)}"
    raise CheckpointError(
        f"student tokenizer ({student}) and teacher tokenizer ({teacher}) differ: {detail}. "
        "Token-level distillation needs one vocabulary; pick a teacher of the student's family."
    )


def check_model_fits_tokenizer(model_config, tokenizer, role: str, path: str) -> None:
    """Raise if the tokenizer has ids beyond the model's vocabulary (``config.vocab_size``)."""
    if len(tokenizer) > model_config.vocab_size:
        raise CheckpointError(
            f"{role} tokenizer has {len(tokenizer)} tokens but the {role} model {path!r} has vocab_size "
            f"{model_config.vocab_size}"
        )
