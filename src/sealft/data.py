"""Read fine-tuning / safety data in the usual formats and normalise it to chat examples.

Every example becomes `{"id": str, "messages": [{"role", "content"}, ...], "meta": {...}}`.
The last message is the assistant response the loss is computed on; everything before it is the
prompt. Ids are the row's own `id` field, else a hash of the normalised messages, so scores learned
on one copy of a dataset apply to any other copy (or re-ordering) of it.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from sealft.errors import ConfigError, DataError
from sealft.io import iter_jsonl, read_jsonl, unreadable

Message = dict[str, str]
Example = dict[str, Any]

_BATCH = 10_000  # rows per Arrow record batch / per read

FORMATS = ("messages", "sharegpt", "prompt_completion", "alpaca", "orca", "hh")

# Fields that identify a format, checked in this order: the first match wins.
_SIGNATURES: list[tuple[str, tuple[str, ...]]] = [
    ("messages", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("prompt_completion", ("prompt", "completion")),
    ("alpaca", ("instruction", "output")),
    ("orca", ("question", "response")),
    ("hh", ("chosen",)),
]
_CONTENT_FIELDS = {"messages", "conversations", "prompt", "completion", "instruction", "input",
                   "output", "system", "system_prompt", "question", "response", "chosen",
                   "rejected", "id"}


def read_rows(source: str, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a JSONL / JSON / Parquet / CSV file (optionally .gz), a saved dataset folder,
    or a Hugging Face dataset id. Any failure to read is a one-line error naming the file."""
    path = Path(source).expanduser()
    if path.is_file():
        with _reading(path):
            return _read_file(path)
    if path.is_dir():
        return _load_saved_dataset(path, split).to_list()
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.endswith(_FILE_SUFFIXES):
        return _read_hub_dataset(source, split)
    raise DataError(f"data file {source} does not exist (checked relative to {Path.cwd()})")


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Any failure to read `path` inside the block becomes a one-line DataError naming it."""
    try:
        yield
    except DataError:
        raise
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as err:
        raise DataError(unreadable(path, err)) from err
    except Exception as err:  # pyarrow / csv raise their own types for damaged files
        reason = " ".join(str(err).split())[:200]
        raise DataError(f"{path}: cannot read it as {_kind(path)} ({reason}); check that "
                        "the file is complete and its name matches its format") from err


def _kind(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    return name.rsplit(".", 1)[-1].upper() if "." in name else "data"


def _read_file(path: Path) -> list[dict[str, Any]]:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return read_jsonl(path)
    if name.endswith((".json", ".json.gz")):
        return _read_json(path)
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if name.endswith((".csv", ".csv.gz")):
        return _read_csv(path)
    raise DataError(
        f"{path}: unknown file type; use .jsonl, .json, .parquet or .csv (optionally .gz)"
    )


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with _open_text(path) as handle:
        rows = list(csv.DictReader(handle))
    for number, row in enumerate(rows, start=1):
        if None in row:  # DictReader files surplus cells under the key None
            raise DataError(f"{path} row {number}: more cells than header columns; quote "
                            "fields that contain commas")
    return rows


def _load_saved_dataset(path: Path, split: str):
    """The (memory-mapped) `datasets.Dataset` saved in folder `path`, split `split`."""
    import datasets

    if (path / "selected.jsonl").is_file():  # a selection run dir given where its data goes
        raise DataError(f"{path}: a selection run folder, not a data file; pass "
                        f"{path / 'selected.jsonl'}")
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError, ValueError, arrow errors...
        raise DataError(f"{path}: a folder, but not a readable dataset saved with "
                        f"save_to_disk ({' '.join(str(err).split())[:160]})") from err
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r}; --split one of {', '.join(loaded)}")
        loaded = loaded[split]
    return loaded


def require_source(source: str, flag: str) -> None:
    """Fail now, not after an earlier stage's compute, when a local data path does not exist."""
    path = Path(source).expanduser()
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.endswith(_FILE_SUFFIXES)
    if not path.exists() and not hub_id:
        raise DataError(f"{flag} {source}: does not exist (checked relative to {Path.cwd()})")


_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".gz")


def iter_rows(source: str, split: str = "train") -> Iterator[dict[str, Any]]:
    """`read_rows` one row at a time where the format allows (JSONL, Parquet, a saved
    dataset), so a million-row file never sits in memory as Python objects."""
    path = Path(source).expanduser()
    name = path.name.lower()
    if path.is_file() and name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        with _reading(path):
            yield from iter_jsonl(path)
    elif path.is_file() and name.endswith(".parquet"):
        import pyarrow.parquet as pq

        with _reading(path):
            for batch in pq.ParquetFile(path).iter_batches(batch_size=_BATCH):
                yield from batch.to_pylist()
    elif path.is_dir():
        loaded = _load_saved_dataset(path, split)  # memory-mapped
        for start in range(0, len(loaded), _BATCH):
            yield from loaded.select(range(start, min(start + _BATCH, len(loaded)))).to_list()
    else:
        yield from read_rows(source, split)


def _read_hub_dataset(name: str, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        return datasets.load_dataset(name, split=split).to_list()
    except Exception as err:  # datasets raises many types for "not found / offline"
        raise DataError(
            f"cannot load dataset {name!r} (split {split!r}) from the hub: {err}. "
            "Pass a local file instead, or check the id and your connection"
        ) from None


def _open_text(path: Path):
    # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8", Windows editors) is not data.
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _read_json(path: Path) -> list[dict[str, Any]]:
    with _open_text(path) as handle:
        text = handle.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # a JSON-lines file with a .json name
            return read_jsonl(path)
        raise DataError(
            f"{path}:{err.lineno}: malformed JSON ({err.msg}, column {err.colno})"
        ) from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of rows (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON list of objects")
    return data


def detect_format(row: dict[str, Any], where: str) -> str:
    for fmt, fields in _SIGNATURES:
        if all(f in row for f in fields):
            return fmt
    raise DataError(
        f"{where}: unknown data format; fields seen: {sorted(row)}. Expected one of: "
        "messages | conversations | prompt+completion | instruction(+input)+output | "
        "question+response (+system_prompt) | chosen. Rename the fields or pass --format"
    )


def _text(row: dict[str, Any], field: str, where: str) -> str:
    if field not in row:
        raise DataError(f"{where}: missing field {field!r}; fields seen: {sorted(row)}")
    value = row[field]
    if value is None:
        raise DataError(f"{where}: field {field!r} is null; give it a string value or "
                        "remove the row")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def _from_messages(row: dict[str, Any], where: str) -> list[Message]:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    out = []
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: messages[{k}] needs 'role' and 'content'")
        out.append({"role": str(message["role"]), "content": str(message["content"] or "")})
    return out


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "model": "assistant"}


def _from_sharegpt(row: dict[str, Any], where: str) -> list[Message]:
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list")
    out = []
    for k, turn in enumerate(turns):
        role = _SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
        if role is None or "value" not in turn:
            raise DataError(f"{where}: conversations[{k}] needs 'from' (human/gpt/system) and 'value'")
        out.append({"role": role, "content": str(turn["value"])})
    return out


def _as_messages(value: Any, role: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]


def _from_prompt_completion(row: dict[str, Any], where: str) -> list[Message]:
    try:
        return _as_messages(row["prompt"], "user") + _as_messages(row["completion"], "assistant")
    except (KeyError, TypeError):
        raise DataError(f"{where}: 'prompt'/'completion' must be strings or message lists") from None


def _from_alpaca(row: dict[str, Any], where: str) -> list[Message]:
    prompt = _text(row, "instruction", where)
    extra = row.get("input") or ""
    if extra:
        prompt = f"{prompt}\n\n{extra}"
    system = row.get("system") or ""
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": prompt},
                   {"role": "assistant", "content": _text(row, "output", where)}]


def _from_orca(row: dict[str, Any], where: str) -> list[Message]:
    system = row.get("system_prompt") or ""
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": _text(row, "question", where)},
                   {"role": "assistant", "content": _text(row, "response", where)}]


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _from_hh(row: dict[str, Any], where: str, field: str = "chosen") -> list[Message]:
    text = _text(row, field, where)
    pieces = _HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    messages = []
    for speaker, content in zip(pieces[1::2], pieces[2::2], strict=False):
        role = "user" if speaker == "Human" else "assistant"
        messages.append({"role": role, "content": content.strip()})
    if not messages:
        raise DataError(f"{where}: {field!r} has no '\\n\\nHuman: ... \\n\\nAssistant: ...' turns")
    return messages


_NORMALISERS: dict[str, Callable[[dict[str, Any], str], list[Message]]] = {
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "prompt_completion": _from_prompt_completion,
    "alpaca": _from_alpaca,
    "orca": _from_orca,
    "hh": _from_hh,
}


def _normalise_row(row: dict[str, Any], fmt: str, where: str) -> list[Message]:
    """One row as messages; any row that does not fit `fmt` is an error naming the row."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with named fields, got {type(row).__name__}")
    fields = dict(_SIGNATURES)[fmt]
    missing = [f for f in fields if f not in row]
    if missing:
        found = next((name for name, need in _SIGNATURES if all(f in row for f in need)), None)
        hint = (f"the row looks like {found} data; every row must use one format (--format "
                "auto detects it from row 1)" if found else f"fields seen: {sorted(row)}")
        raise DataError(f"{where}: missing field {missing[0]!r} (format {fmt}); {hint}")
    try:
        return _NORMALISERS[fmt](row, where)
    except DataError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise DataError(f"{where}: not a valid {fmt} row ({type(err).__name__}: {err}); fields "
                        f"seen: {sorted(row)}") from err


def example_id(messages: list[Message]) -> str:
    blob = json.dumps(messages, ensure_ascii=False, sort_keys=True)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


def normalise(
    rows: list[dict[str, Any]],
    source: str = "<data>",
    fmt: str = "auto",
    drop_duplicates: bool = False,
) -> list[Example]:
    """Turn raw rows into examples with stable, unique ids. Never silently drops a row:
    `drop_duplicates` is the one opt-in exception, for exact repeats."""
    examples = list(normalise_rows(rows, source, fmt, drop_duplicates))
    if not examples:
        raise DataError(f"{source}: the dataset is empty; nothing to select or train on")
    return examples


def normalise_rows(
    rows: Iterable[dict[str, Any]],
    source: str = "<data>",
    fmt: str = "auto",
    drop_duplicates: bool = False,
) -> Iterator[Example]:
    """`normalise`, one example at a time (an empty input yields nothing)."""
    if fmt != "auto" and fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: use auto or one of {', '.join(FORMATS)}")
    row_fmt = None if fmt == "auto" else fmt
    first_row_of: dict[str, int] = {}
    for index, row in enumerate(rows):
        where = f"{source} row {index + 1}"  # 1-based, like the line numbers of a JSONL file
        if row_fmt is None:  # the first row decides the format of all
            row_fmt = detect_format(row, where)
        messages = _normalise_row(row, row_fmt, where)
        ex_id = str(row["id"]) if row.get("id") not in (None, "") else example_id(messages)
        if ex_id in first_row_of:
            if drop_duplicates and "id" not in row:
                continue
            raise DataError(
                f"{source}: rows {first_row_of[ex_id] + 1} and {index + 1} have the same id "
                f"{ex_id!r}"
                + (" (identical content)" if "id" not in row else "")
                + "; remove one, give rows distinct 'id' fields, or pass drop_duplicates=true"
            )
        first_row_of[ex_id] = index
        meta = {k: v for k, v in row.items() if k not in _CONTENT_FIELDS}
        yield {"id": ex_id, "index": index, "messages": messages, "meta": meta}


class Examples(Sequence):
    """Examples in a memory-mapped Arrow file rather than as Python objects: a million chat
    rows cost disk, not RAM. `examples[k]` builds the one example dict asked for; a slice or
    `take` is a view over the same file. Written once, read-only after."""

    def __init__(self, dataset, positions: np.ndarray | None = None, keep: Any = None):
        self.dataset = dataset  # datasets.Dataset: id, index, messages (JSON), meta (JSON)
        self.table = dataset.data.table  # the pyarrow view of the same memory map
        self.positions = positions
        self._keep = keep  # the temporary folder of the file, removed with the last view

    @classmethod
    def write(cls, examples: Iterable[Example], folder: Path) -> Examples:
        """Stream `examples` to folder/examples.arrow in record batches and map it."""
        import datasets
        import pyarrow as pa

        schema = pa.schema([("id", pa.string()), ("index", pa.int64()),
                            ("messages", pa.string()), ("meta", pa.string())])
        path = folder / "examples.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for batch in _batched(examples, _BATCH):
                writer.write_batch(pa.record_batch([
                    [e["id"] for e in batch], [e["index"] for e in batch],
                    [json.dumps(e["messages"], ensure_ascii=False) for e in batch],
                    [json.dumps(e["meta"], ensure_ascii=False, default=str) for e in batch],
                ], schema=schema))
        return cls(datasets.Dataset.from_file(str(path)))

    def __len__(self) -> int:
        return self.table.num_rows if self.positions is None else len(self.positions)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self.take(np.arange(len(self))[key])
        k = int(key)
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(f"example {key} of {len(self)}")
        row = k if self.positions is None else int(self.positions[k])
        return _decode(self.table.slice(row, 1).to_pylist()[0])

    def __iter__(self) -> Iterator[Example]:
        # A batch at a time: per-row slicing of the table is the slow way through a million.
        for start in range(0, len(self), _BATCH):
            if self.positions is None:
                part = self.table.slice(start, _BATCH)
            else:
                part = self.table.take(self.positions[start:start + _BATCH])
            yield from (_decode(row) for row in part.to_pylist())

    def take(self, positions: Sequence[int]) -> Examples:
        """The examples at `positions` (a view; row numbers stay the input's)."""
        positions = np.asarray(positions, dtype=np.int64)
        if self.positions is not None:
            positions = self.positions[positions]
        return Examples(self.dataset, positions, self._keep)

    def column(self, name: str) -> list:
        """One plain column (id or index) for all examples, in order, without decoding JSON."""
        values = self.table.column(name)
        if self.positions is not None:
            values = values.take(self.positions)
        return values.to_pylist()

    def raw_rows(self, *names: str) -> Iterator[tuple]:
        """Tuples of the stored values of columns `names`, batch by batch, in this view's
        order, without decoding: messages and meta stay the JSON text they are kept as."""
        for start in range(0, len(self), _BATCH):
            if self.positions is None:
                part = self.table.slice(start, _BATCH)
            else:
                part = self.table.take(self.positions[start:start + _BATCH])
            yield from zip(*(part.column(name).to_pylist() for name in names), strict=True)

    def as_dataset(self):
        """The examples as a `datasets.Dataset` (for `map`), in this view's order."""
        if self.positions is None:
            return self.dataset
        return self.dataset.select(self.positions)


def _decode(row: dict[str, Any]) -> Example:
    row["messages"] = json.loads(row["messages"])
    row["meta"] = json.loads(row["meta"])
    return row


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def load_examples(
    source: str,
    split: str = "train",
    fmt: str = "auto",
    limit: int | None = None,
    drop_duplicates: bool = False,
) -> Examples:
    """iter_rows + normalise into a memory-mapped `Examples`. `limit` keeps the first rows
    (a deterministic subset)."""
    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit: must be a positive number of rows, got {limit}")
    import itertools
    import shutil
    import tempfile
    import weakref

    from sealft.models import CACHE_DIR  # on disk: a tmpfs /tmp would put the file in RAM

    root = CACHE_DIR / "examples"
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=root))
    try:
        rows = itertools.islice(iter_rows(source, split), limit)
        examples = Examples.write(normalise_rows(rows, source, fmt, drop_duplicates), folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    # The folder lives as long as some view of it; removed when the last one is collected.
    keep = _Folder(folder)
    weakref.finalize(keep, shutil.rmtree, folder, True)
    examples._keep = keep
    if len(examples) == 0:
        raise DataError(f"{source}: the dataset is empty; nothing to select or train on")
    return examples


class _Folder:
    def __init__(self, path: Path):
        self.path = path


def ids_at(examples: Sequence[Example], rows: Iterable[int]) -> list[str]:
    """The ids of the examples at `rows`; from an `Examples` file, one column read."""
    if isinstance(examples, Examples):
        return examples.take(np.asarray(rows, dtype=np.int64)).column("id")
    return [examples[r]["id"] for r in rows]


def sample_rows(examples: Sequence[Example], n: int | None, seed: int) -> Sequence[Example]:
    """A seeded random subset that keeps input order (so row numbers stay meaningful)."""
    if n is not None and n <= 0:
        raise ConfigError(f"--sample: must be a positive number of rows, got {n}")
    if n is None or n >= len(examples):
        return examples
    import random

    picked = sorted(random.Random(seed).sample(range(len(examples)), n))
    if isinstance(examples, Examples):
        return examples.take(picked)
    return [examples[i] for i in picked]


def is_preference_data(rows: list[dict[str, Any]]) -> bool:
    return bool(rows) and "chosen" in rows[0] and "rejected" in rows[0]


def _pair(row: dict[str, Any], where: str) -> tuple[list[Message], list[Message]]:
    try:
        if "prompt" in row:
            prompt = _as_messages(row["prompt"], "user")
            return (prompt + _as_messages(row["chosen"], "assistant"),
                    prompt + _as_messages(row["rejected"], "assistant"))
        return _from_hh(row, where, "chosen"), _from_hh(row, where, "rejected")
    except DataError:
        raise
    except (KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{where}: not a valid preference pair ({type(err).__name__}: {err}); "
                        "expected chosen/rejected strings or message lists") from err


def pairs_from_rows(rows: list[dict[str, Any]], source: str) -> list[tuple[Example, Example]]:
    """Preference pairs (chosen, rejected) from Anthropic-HH style dialogues or TRL's
    {prompt, chosen, rejected}. Pairs whose final answers are identical carry no preference
    and are left out (counted by the caller from the returned length)."""
    if not rows:
        raise DataError(f"{source}: the preference dataset is empty")
    if not all(k in rows[0] for k in ("chosen", "rejected")):
        raise DataError(f"{source}: preference pairs need 'chosen' and 'rejected' fields; "
                        f"fields seen: {sorted(rows[0])}")
    pairs = []
    for index, row in enumerate(rows):
        where = f"{source} row {index + 1}"
        chosen, rejected = _pair(row, where)
        if chosen[-1]["content"] == rejected[-1]["content"]:
            continue
        pair_id = example_id(chosen + rejected)
        pairs.append(({"id": pair_id, "index": index, "messages": chosen, "meta": {}},
                      {"id": pair_id, "index": index, "messages": rejected, "meta": {}}))
    return pairs
