"""Prompt sources: read the rows of a ``DataConfig.path`` as dicts, whatever holds them.

- ``.jsonl`` / ``.json`` files, read with the ``json`` module (a ``.json`` file holds an array of
  objects, or JSON lines);
- ``.parquet`` files, read with pyarrow (nested columns become dicts and lists);
- a directory written by ``datasets.save_to_disk`` (``datasets.load_from_disk``), another local
  directory holding data files, or a hub name ``owner/name`` (``datasets.load_dataset``).

A source that cannot be read raises ``DataError`` naming it and the problem.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tip_ray.config import DataConfig

Row = dict[str, Any]

FILE_FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SAVED_DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


class DataError(ValueError):
    """A prompt source that cannot be used as configured; the message names the source and the problem."""


# ---------------------------------------------------------------------------------------------
# Reading rows


def get_field(row: Mapping[str, Any], path: str) -> Any:
    """The value at ``path`` in ``row``: an exact key first, else a dotted path (``a.b.c``) into
    nested mappings. Raises ``KeyError`` naming the first missing part and the keys available there."""
    if path in row:
        return row[path]
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            available = sorted(value) if isinstance(value, Mapping) else f"a {type(value).__name__}, not a record"
            raise KeyError(f"field {path!r}: no {part!r} (available: {available})")
        value = value[part]
    return value


def read_rows(cfg: DataConfig) -> list[Row]:
    """The raw rows of ``cfg.path`` as dicts (nested fields as dicts/lists), the first ``cfg.limit``
    of them when a limit is set. Raises ``DataError`` for a missing path, an unknown extension, or a
    file or dataset that cannot be read."""
    fmt, target = _resolve_source(cfg)
    if fmt == "jsonl":
        rows = _read_jsonl(Path(target), cfg.limit)
    elif fmt == "json":
        rows = _read_json(Path(target))
    elif fmt == "parquet":
        rows = _read_parquet(Path(target), cfg.limit)
    else:
        rows = _read_hf(target, cfg.split, cfg.limit)
    return rows[: cfg.limit] if cfg.limit is not None else rows


def _resolve_source(cfg: DataConfig) -> tuple[str, str]:
    """(format, target) with format in jsonl/json/parquet/hf; target is a file, directory or hub name."""
    path = Path(cfg.path).expanduser()
    if cfg.format in FILE_FORMATS.values():
        if path.is_dir():
            raise DataError(f"{cfg.path}: is a directory; data.format={cfg.format} reads one file (use auto or hf)")
        if not path.is_file():
            raise DataError(f"{cfg.path}: no such file")
        return cfg.format, str(path)
    if path.is_file():
        if cfg.format == "hf":
            raise DataError(f"{cfg.path}: is a file; data.format=hf reads a directory or a hub dataset name")
        suffix = path.suffix.lower()
        if suffix not in FILE_FORMATS:
            raise DataError(
                f"{cfg.path}: unknown extension {suffix!r} (known: {sorted(FILE_FORMATS)}); "
                "rename the file or set data.format"
            )
        return FILE_FORMATS[suffix], str(path)
    if path.is_dir():
        return "hf", str(path)
    if cfg.format == "hf" or (_HUB_NAME.match(cfg.path) and path.suffix.lower() not in FILE_FORMATS):
        return "hf", cfg.path
    raise DataError(f"{cfg.path}: no such file or directory")


def _read_jsonl(path: Path, limit: int | None) -> list[Row]:
    rows: list[Row] = []
    try:
        with path.open(encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                if limit is not None and len(rows) >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}: line {line_no} is not valid JSON ({err.msg})") from err
                if not isinstance(row, dict):
                    raise DataError(f"{path}: line {line_no} is a JSON {type(row).__name__}, expected an object")
                rows.append(row)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason})") from err
    return rows


def _read_json(path: Path) -> list[Row]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason})") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path, None)  # a .json file holding JSON lines
    if not isinstance(data, list):
        raise DataError(f"{path}: holds a JSON {type(data).__name__}; expected an array of objects or JSON lines")
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: element {index} is a JSON {type(row).__name__}, expected an object")
    return data


def _read_parquet(path: Path, limit: int | None) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: cannot read as parquet ({err})") from err
    if limit is not None:
        table = table.slice(0, limit)
    return table.to_pylist()


def _read_hf(target: str, split: str, limit: int | None) -> list[Row]:
    import datasets

    path = Path(target).expanduser()
    try:
        if path.is_dir() and any((path / marker).exists() for marker in _SAVED_DATASET_MARKERS):
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(str(path) if path.is_dir() else target, split=split)
    except Exception as err:  # datasets raises many types (FileNotFoundError, ValueError, hub errors)
        where = "local directory" if path.is_dir() else "not a local path; as a hub dataset"
        raise DataError(f"{target}: cannot load with datasets ({where}): {type(err).__name__}: {err}") from err
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{target}: no split {split!r} (available: {sorted(loaded)}); set data.split")
        loaded = loaded[split]
    if limit is not None:
        loaded = loaded.select(range(min(limit, len(loaded))))
    return loaded.to_list()
