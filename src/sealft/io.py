"""Atomic file writes and the small JSON helpers every stage shares.

Every output goes through `atomic_write`: a crash mid-write leaves the previous file (or no
file), never a truncated one, because readers only ever see a completed `os.replace`.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import yaml

from sealft.errors import DataError, SealftError


@contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temp file next to `path`; on success fsync and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(path: str | Path, save: Callable[[str], None]) -> None:
    """Atomically write a file produced by a library `save(filename)` function."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_write(path) as handle:
        json.dump(obj, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    with atomic_write(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_yaml(path: str | Path, obj: Any) -> None:
    with atomic_write(path) as handle:
        yaml.safe_dump(obj, handle, sort_keys=False, allow_unicode=True)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file (optionally .gz); a malformed line is an error naming the file and
    line number."""
    return list(iter_jsonl(path))


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """`read_jsonl` one row at a time, for files too large to hold as Python objects."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{line_no}: malformed JSON line ({err.msg}, column {err.colno}); "
                    "fix or delete that line"
                ) from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object per line")
            yield row


def append_jsonl(path: str | Path, row: dict[str, Any]) -> None:
    """Append one line (logs); a torn last line is tolerated by `read_jsonl` callers that resume."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()


def prepare_output_dir(path: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Create the run directory; refuse to clobber a non-empty one unless told to."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SealftError(f"output dir {path} exists and is not a directory")
    if path.exists() and any(path.iterdir()) and not (overwrite or resume):
        raise SealftError(
            f"output dir {path} exists and is not empty; pass --overwrite to replace its "
            "contents or --resume to continue the run in it"
        )
    if overwrite and path.exists() and not resume:
        import shutil

        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path
