"""The CUDA suite: the plain worker classes in-process on a GPU (no Ray, no vLLM).

Every test here is marked ``gpu`` and skipped when torch sees no CUDA device, so CI (CPU only)
collects the suite without running it. ``bench/gpu_check.py`` runs it on a GPU machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_qwen3 import QWEN3_VOCAB, save_qwen3


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)


@pytest.fixture(scope="session")
def qwen3_student(tmp_path_factory) -> str:
    """A 2-layer random Qwen3 student at vocabulary 151,936, bf16 on disk."""
    return save_qwen3(tmp_path_factory.mktemp("qwen3") / "student", vocab_size=QWEN3_VOCAB, hidden=256, seed=0)


@pytest.fixture(scope="session")
def qwen3_teacher(tmp_path_factory) -> str:
    """A 2-layer random Qwen3 teacher (wider than the student) at vocabulary 151,936, bf16 on disk."""
    return save_qwen3(tmp_path_factory.mktemp("qwen3") / "teacher", vocab_size=QWEN3_VOCAB, hidden=384, heads=6,
                      seed=1)
