"""A deterministic, offline prompt set for a small instruct pair (SmolLM2-135M and its student).

Three kinds of prompt, each from a few families of templates filled from a seeded RNG:

- ``arithmetic``: one-step word problems (add, subtract, multiply, share equally) with an integer
  answer;
- ``qa``: questions with a short checkable integer answer: letters in a word or words in a list, the larger (or smaller) of two
  numbers, unit conversions, the next number of an arithmetic sequence;
- ``instruction``: short open instructions (a sentence, a title, three words): no answer.

Answered prompts ask for the final answer as a number; their answers are integers as strings,
graded by ``grader=math`` (math-verify reads the last number of a response when there is no
``\\boxed{}``). ``make_splits`` draws the held-out split first and the training split from what
is left, so no prompt text is in both. Rows are written as the ``DataConfig`` presets read them:
``{"id", "prompt", "answer" (str or null), "kind", "family"}``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

ANSWER_HINT = " Give the final answer as a number."
KINDS = ("arithmetic", "qa", "instruction")


@dataclass(frozen=True)
class PromptRow:
    """One prompt: ``answer`` is an integer as a string, or None for an instruction."""

    kind: str
    family: str
    prompt: str
    answer: str | None

    @property
    def uid(self) -> str:
        """A stable id from the family and the prompt text (unique, since prompt texts are)."""
        return f"{self.family}:{hashlib.sha1(self.prompt.encode()).hexdigest()[:12]}"

    def to_json(self) -> dict[str, str | None]:
        """The JSONL row."""
        return {"id": self.uid, "prompt": self.prompt, "answer": self.answer, "kind": self.kind,
                "family": self.family}


_NAMES = ("Tom", "Mia", "Sam", "Ana", "Leo", "Zoe", "Ben", "Ivy", "Max", "Eva", "Noah", "Lily")
_ITEMS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "shells", "cards", "coins", "stamps")
_CONTAINERS = (("box", "boxes"), ("bag", "bags"), ("jar", "jars"), ("basket", "baskets"), ("shelf", "shelves"))
_WORDS = ("cat", "house", "garden", "river", "pencil", "window", "elephant", "music", "yellow", "planet",
          "orange", "bridge", "computer", "mountain", "summer", "chair", "teacher", "dragon", "banana", "rocket",
          "island", "forest", "candle", "guitar", "winter", "bottle", "castle", "pocket", "silver", "turtle")
_TOPICS = ("the sea", "a rainy day", "a small dog", "the moon", "a city at night", "autumn leaves", "a train trip",
           "a birthday party", "a lost key", "a quiet library", "the first snow", "a red balloon", "a busy market",
           "a mountain lake", "an old clock", "a garden in spring", "a sleepy cat", "the desert", "a robot friend",
           "a thunderstorm", "a picnic", "a school day", "the night sky", "a bicycle ride", "fresh bread",
           "a lighthouse", "a new friend", "the ocean waves", "a hot summer day", "a snowman", "a music lesson",
           "a farm", "a rainbow", "a treasure map", "a kind neighbour", "a football game")
_UNITS = (("minutes", "hours", 60), ("seconds", "minutes", 60), ("centimeters", "meters", 100),
          ("days", "weeks", 7), ("months", "years", 12), ("grams", "kilograms", 1000), ("hours", "days", 24))


def _add(rng: random.Random) -> PromptRow:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    text = f"{name} has {a} {item}. {name} gets {b} more. How many {item} does {name} have now?"
    return PromptRow("arithmetic", "add", text + ANSWER_HINT, str(a + b))


def _subtract(rng: random.Random) -> PromptRow:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a = rng.randint(10, 90)
    b = rng.randint(1, a - 1)
    text = f"{name} had {a} {item} and gave {b} of them away. How many {item} are left?"
    return PromptRow("arithmetic", "subtract", text + ANSWER_HINT, str(a - b))


def _multiply(rng: random.Random) -> PromptRow:
    item = rng.choice(_ITEMS)
    one, many = rng.choice(_CONTAINERS)
    per, count = rng.randint(2, 12), rng.randint(2, 9)
    text = f"Each {one} holds {per} {item}. How many {item} are in {count} {many}?"
    return PromptRow("arithmetic", "multiply", text + ANSWER_HINT, str(per * count))


def _share(rng: random.Random) -> PromptRow:
    item = rng.choice(_ITEMS)
    people, each = rng.randint(2, 9), rng.randint(2, 12)
    text = f"{people * each} {item} are shared equally among {people} children. How many {item} does each child get?"
    return PromptRow("arithmetic", "share", text + ANSWER_HINT, str(each))


def _count(rng: random.Random) -> PromptRow:
    if rng.random() < 0.2:
        word = rng.choice(_WORDS)
        return PromptRow("qa", "count", f"How many letters are in the word \"{word}\"?" + ANSWER_HINT,
                         str(len(word)))
    words = rng.sample(_WORDS, rng.randint(2, 8))
    return PromptRow("qa", "count", f"How many words are in this list: {', '.join(words)}?" + ANSWER_HINT,
                     str(len(words)))


def _larger(rng: random.Random) -> PromptRow:
    a, b = rng.sample(range(1, 1000), 2)
    which = rng.choice(("larger", "smaller"))
    answer = max(a, b) if which == "larger" else min(a, b)
    return PromptRow("qa", "compare", f"Which number is {which}: {a} or {b}?" + ANSWER_HINT, str(answer))


def _convert(rng: random.Random) -> PromptRow:
    small, big, factor = rng.choice(_UNITS)
    n = rng.randint(2, 40)
    return PromptRow("qa", "convert", f"How many {small} are in {n} {big}?" + ANSWER_HINT, str(n * factor))


def _next_number(rng: random.Random) -> PromptRow:
    start, step = rng.randint(1, 30), rng.randint(1, 9)
    terms = ", ".join(str(start + i * step) for i in range(4))
    return PromptRow("qa", "sequence", f"What is the next number in the sequence {terms}?" + ANSWER_HINT,
                     str(start + 4 * step))


def _instruction(rng: random.Random) -> PromptRow:
    topic = rng.choice(_TOPICS)
    template = rng.choice((
        "Write one sentence about {t}.",
        "Give a short title for a story about {t}.",
        "List three words that describe {t}.",
        "Describe {t} in one short sentence.",
        "Write a short question a child might ask about {t}.",
        "Write a two-line poem about {t}.",
        "Explain in one sentence why people like {t}.",
        "Suggest a name for a song about {t}.",
        "Write a friendly greeting card message about {t}.",
        "Give one fun fact someone might say about {t}.",
    ))
    return PromptRow("instruction", "instruction", template.format(t=topic), None)


Family = Callable[[random.Random], PromptRow]
FAMILIES: dict[str, tuple[Family, float]] = {
    "add": (_add, 0.12), "subtract": (_subtract, 0.12), "multiply": (_multiply, 0.12), "share": (_share, 0.12),
    "count": (_count, 0.1), "compare": (_larger, 0.08),
    "convert": (_convert, 0.08), "sequence": (_next_number, 0.1), "instruction": (_instruction, 0.16),
}


def _counts(total: int) -> dict[str, int]:
    """``total`` split over the families by weight (largest remainders), each family at least 0."""
    weights = {name: weight for name, (_, weight) in FAMILIES.items()}
    scale = total / sum(weights.values())
    counts = {name: int(w * scale) for name, w in weights.items()}
    by_remainder = sorted(weights, key=lambda n: weights[n] * scale - counts[n], reverse=True)
    for name in by_remainder[: total - sum(counts.values())]:
        counts[name] += 1
    return counts


def _draw(rng: random.Random, family: str, count: int, exclude: set[str], split: str) -> list[PromptRow]:
    make = FAMILIES[family][0]
    rows: dict[str, PromptRow] = {}
    attempts = 0
    while len(rows) < count:
        attempts += 1
        if attempts > 200 * count + 1000:
            raise ValueError(f"cannot draw {count} distinct {family!r} prompts for the {split} split "
                             f"({len(rows)} found); ask for fewer prompts")
        row = make(rng)
        if row.prompt not in exclude:
            rows.setdefault(row.prompt, row)
    return list(rows.values())


def make_splits(seed: int, num_train: int, num_test: int) -> tuple[list[PromptRow], list[PromptRow]]:
    """Deterministic train and held-out rows with no prompt text in both (held-out drawn first).

    Each split holds the families in proportion to their weights and is shuffled with the seed;
    the same ``(seed, num_train, num_test)`` always gives the same rows. ``ValueError`` when a
    family cannot supply enough distinct prompts.
    """
    if num_train < 1 or num_test < 1:
        raise ValueError(f"need num_train >= 1 and num_test >= 1, got {num_train}, {num_test}")
    rng = random.Random(seed)
    test = [row for family, n in _counts(num_test).items() for row in _draw(rng, family, n, set(), "test")]
    taken = {row.prompt for row in test}
    train = [row for family, n in _counts(num_train).items() for row in _draw(rng, family, n, taken, "train")]
    rng.shuffle(test)
    rng.shuffle(train)
    return train, test


def write_jsonl(rows: Iterable[PromptRow], path: Path) -> int:
    """Write ``rows`` as JSON lines (atomically: a temporary file renamed into place); returns the count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with tmp.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row.to_json()) + "\n")
            count += 1
    tmp.replace(path)
    return count
