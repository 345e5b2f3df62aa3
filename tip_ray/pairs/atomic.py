"""Write a directory atomically: build it under a temporary sibling name, rename it into place."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(target: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``target``; on a clean exit rename it to ``target``.

    On an exception the temporary directory is removed and ``target`` is left as it was, so a
    crash never leaves a half-written checkpoint under the real name. With ``replace`` an existing
    ``target`` is removed just before the rename; without it an existing ``target`` raises
    ``FileExistsError`` (checked before and after the body runs).
    """
    target = Path(target)
    if target.exists() and not replace:
        raise FileExistsError(f"{target} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            if not replace:
                raise FileExistsError(f"{target} appeared while it was being written")
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
