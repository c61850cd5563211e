"""Atomic file writes, the run-directory manifest and the small JSON helpers every stage shares.

Every output goes through `atomic_write`: a crash mid-write leaves the previous file (or no
file), never a truncated one, because readers only ever see a completed `os.replace`.

Every run directory holds `.sealft-manifest.json`: the command that made it and the top-level
names sealft wrote there, recorded *before* each is created. `--overwrite` deletes only those
names, and refuses (deleting nothing) when the directory holds anything else or one of the run's
own inputs: sealft never deletes a file it did not write.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import IO, Any

import yaml

from sealft.errors import ConfigError, DataError, SealftError

MANIFEST = ".sealft-manifest.json"
# What a run writes before it starts work. A directory holding only these (and the manifest)
# is a failed start: rerunning the corrected command reuses it instead of demanding --overwrite.
START_FILES = frozenset({"config.yaml", "logs"})
# Temp files of atomic writes are `.NAME.RANDOM.tmp`; a kill can leave one behind.
_TEMP = re.compile(r"^\.(?P<name>.+)\.[^.]+\.tmp$")


@cache
def _file_mode() -> int:
    # mkstemp creates files 0600; outputs should get what open() would give them (0666 & ~umask).
    # The umask can only be read by setting it, so it is read once, before any worker threads.
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _temp_next_to(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, _file_mode())
    os.close(fd)
    return tmp


@contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temp file next to `path`; on success fsync and rename it over `path`."""
    path = Path(path)
    record_output(path)
    tmp = _temp_next_to(path)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as handle:
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
    record_output(path)
    tmp = _temp_next_to(path)
    try:
        save(tmp)
        os.chmod(tmp, _file_mode())  # some savers replace the file instead of writing into it
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


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256, read in blocks (weights run to gigabytes)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file (optionally .gz); a malformed line is an error naming the file and
    line number. A UTF-8 byte-order mark (Windows editors, Excel) is ignored."""
    return list(iter_jsonl(path))


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """`read_jsonl` one row at a time, for files too large to hold as Python objects."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as handle:
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
                    raise DataError(f"{path}:{line_no}: expected a JSON object per line, got "
                                    f"{type(row).__name__}")
                yield row
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as err:
        raise DataError(unreadable(path, err)) from err


def unreadable(path: str | Path, err: BaseException) -> str:
    """One line saying why a data file cannot be read, and what to do about it."""
    if isinstance(err, FileNotFoundError):
        return f"{path}: file not found (checked relative to {Path.cwd()})"
    if isinstance(err, IsADirectoryError):
        return f"{path}: a folder, not a file"
    if isinstance(err, PermissionError):
        return f"{path}: permission denied; make it readable"
    if isinstance(err, gzip.BadGzipFile):
        return f"{path}: not a gzip file although its name ends in .gz; rename or recompress it"
    if isinstance(err, EOFError | zlib.error):
        return (f"{path}: the compressed file is truncated or corrupt ({err}); copy or "
                "download it again")
    if isinstance(err, UnicodeDecodeError):
        return (f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                f"{err.start}); save it as UTF-8")
    return f"{path}: cannot read ({err}); check the file"


def append_jsonl(path: str | Path, row: dict[str, Any]) -> None:
    """Append one line (logs); a torn last line is tolerated by `read_jsonl` callers that resume."""
    record_output(Path(path))
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()


# ---------------------------------------------------------------------------------------------
# Run directories and their manifests
# ---------------------------------------------------------------------------------------------

# Run dirs this process writes into (resolved path -> manifest dict); every write under one is
# recorded in its manifest before it happens.
_ACTIVE: dict[Path, dict[str, Any]] = {}
# Run dirs this process started from nothing (path -> whether it created the folder): a start
# that fails before any work is undone there, so the dir is left as it was found.
_FRESH: dict[Path, bool] = {}


def read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and isinstance(data.get("outputs"), list)
    return data if ok else None


def _save_manifest(root: Path, manifest: dict[str, Any]) -> None:
    # Not via atomic_write: that would record the manifest in itself.
    tmp = _temp_next_to(root / MANIFEST)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, root / MANIFEST)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def record_output(path: Path, *names: str) -> None:
    """Note `path` (or `names` inside the run dir `path`) in the manifest of every active run
    dir that holds it, before the file is created, so a crash cannot leave an unlisted output."""
    if not _ACTIVE:
        return
    target = Path(os.path.abspath(path))
    for root, manifest in _ACTIVE.items():
        if names and target == root:
            new = [n for n in names if n not in manifest["outputs"]]
        elif target != root and target.is_relative_to(root):
            top = target.relative_to(root).parts[0]
            new = [top] if top != MANIFEST and top not in manifest["outputs"] else []
        else:
            continue
        if new:
            manifest["outputs"] += new
            _save_manifest(root, manifest)


def manifest_value(root: str | Path, key: str, value: Any = None) -> Any:
    """Read (value None) or set one entry of an active run dir's manifest."""
    manifest = _ACTIVE.get(Path(os.path.abspath(root)))
    if manifest is None:
        return None
    if value is not None:
        manifest[key] = value
        _save_manifest(Path(os.path.abspath(root)), manifest)
    return manifest.get(key)


def _is_ours(name: str, manifest: dict[str, Any] | None) -> bool:
    if name == MANIFEST or manifest is None:
        return name == MANIFEST
    temp = _TEMP.match(name)
    return name in manifest["outputs"] or bool(temp and temp["name"] in manifest["outputs"])


def foreign_files(root: Path) -> list[str]:
    """Paths (relative to root) in a run dir that no sealft run recorded writing; listed run
    folders that are run dirs themselves (`run`'s select/, finetune/) are checked inside too."""
    manifest = read_manifest(root)
    found = []
    for entry in sorted(root.iterdir()):
        if not _is_ours(entry.name, manifest):
            found.append(entry.name + ("/" if entry.is_dir() else ""))
        elif entry.is_dir() and (entry / MANIFEST).exists():
            found += [f"{entry.name}/{inner}" for inner in foreign_files(entry)]
    return found


def _is_failed_start(root: Path) -> bool:
    """Only what a run writes before work starts (config, manifest), also in nested runs."""
    if read_manifest(root) is None:
        return False
    for entry in root.iterdir():
        if entry.name in (MANIFEST, *START_FILES):
            continue
        if not (entry.is_dir() and _is_failed_start(entry)):
            return False
    return True


def _inputs_inside(root: Path, inputs: Iterable[str | Path | None]) -> list[str]:
    root = root.resolve()
    inside = []
    for item in inputs:
        if not item:
            continue
        path = Path(item).expanduser()
        if path.exists() and (path.resolve() == root or path.resolve().is_relative_to(root)):
            inside.append(str(item))
    return inside


def _listing(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def remove_previous_outputs(root: Path, stage: str, inputs: Iterable[str | Path | None] = (),
                            flag: str = "--overwrite") -> None:
    """Delete what an earlier `stage` run wrote in `root`, after checking that nothing else is
    there: files sealft did not write, or this run's own inputs, stop it before any deletion."""
    inside = _inputs_inside(root, inputs)
    if inside:
        raise SealftError(
            f"{flag}: {_listing(inside)} is an input of this run but lies inside the output "
            f"dir {root}; nothing was deleted. Move it out or choose another --output-dir"
        )
    require_stage(root, stage, flag)
    foreign = foreign_files(root)
    if foreign:
        raise SealftError(
            f"{flag}: output dir {root} holds files sealft did not write "
            f"({_listing(foreign)}); nothing was deleted. Move them out or choose another "
            "--output-dir"
        )
    manifest = read_manifest(root) or {"outputs": []}
    _remove_recorded(root, manifest["outputs"]
                     + [n.name for n in root.iterdir() if _TEMP.match(n.name)])


def _remove_recorded(root: Path, names: list[str]) -> None:
    """Delete the named entries of `root` (names the manifest recorded) and the manifest."""
    for name in names:
        target = root / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    (root / MANIFEST).unlink(missing_ok=True)


def require_stage(root: Path, stage: str, flag: str) -> None:
    """A run dir is only ever continued or replaced by the command that made it."""
    manifest = read_manifest(root)
    if manifest and manifest.get("stage") not in (None, stage):
        raise SealftError(
            f"{flag}: output dir {root} holds a `sealft {manifest['stage']}` run, not a "
            f"{stage} run; nothing was changed. Choose another --output-dir"
        )


def track(root: Path, stage: str) -> dict[str, Any]:
    """Start (or continue) recording what this process writes in `root`."""
    root = Path(os.path.abspath(root))
    manifest = read_manifest(root) or {"stage": stage, "outputs": []}
    manifest.setdefault("stage", stage)
    _ACTIVE[root] = manifest
    _save_manifest(root, manifest)
    return manifest


def untrack_all() -> None:
    """Forget the run dirs of a finished command (the CLI calls this after every command)."""
    _ACTIVE.clear()
    _FRESH.clear()


def undo_failed_starts() -> None:
    """After an error: remove what this process wrote in run dirs it started fresh, when no
    work was done there yet (only config and manifest). Nested dirs go first."""
    for root in sorted(_FRESH, key=lambda p: len(p.parts), reverse=True):
        if not (root.is_dir() and _is_failed_start(root)):
            continue
        manifest = read_manifest(root) or {"outputs": []}
        _remove_recorded(root, manifest["outputs"])
        if _FRESH[root] and not any(root.iterdir()):
            root.rmdir()


def prepare_output_dir(path: str | Path, overwrite: bool = False, resume: bool = False,
                       stage: str = "run", inputs: Iterable[str | Path | None] = ()) -> Path:
    """Create or reuse the run directory, refusing anything that could lose a file.

    New or empty: used. A failed start's leftovers (config, manifest): replaced. --resume:
    continued (it must be a run of the same command). --overwrite: sealft's earlier outputs are
    deleted, unless the dir holds anything sealft did not write or this run's inputs."""
    path = Path(path)
    record_output(path)  # a stage dir inside `sealft run`'s dir belongs to that run
    existed = path.exists()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output-dir {path} exists and is not a directory; choose another "
                          "path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--output-dir {path}: cannot create it ({err.strerror}); choose a "
                          "writable location") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"--output-dir {path}: not writable; choose a writable location")
    fresh = True
    if any(path.iterdir()):
        fresh = False
        manifest = read_manifest(path)
        if resume:
            require_stage(path, stage, "--resume")
        elif overwrite or _is_failed_start(path):
            remove_previous_outputs(path, stage, inputs)
            fresh = True  # emptied: a failure from here on is undone down to the empty dir
        else:
            what = ("an unfinished or finished sealft run" if manifest else
                    f"files sealft did not write ({_listing(foreign_files(path))})")
            hint = ("pass --resume to continue it, --overwrite to replace it, or "
                    if manifest else "")
            raise SealftError(f"output dir {path} is not empty: it holds {what}; {hint}"
                              "choose another --output-dir")
    track(path, stage)
    if fresh:
        mark_fresh(path, created=not existed)
    return path


def mark_fresh(root: Path, created: bool) -> None:
    """`root` was empty (or new, `created`) when this process started its run there."""
    _FRESH[Path(os.path.abspath(root))] = created
