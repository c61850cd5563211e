"""The loop the research probes share: the same mixes (dev mixes, seeded SST-2 subsets), one
finished file per mix in the probe's output folder, and a rerun that skips what is done, so
that a probe stopped after hours of CPU resumes where it stopped."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sealft.data import load_examples, sample_rows
from sealft.io import read_jsonl, write_jsonl


def add_mix_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mixes", nargs="*", default=[],
                        help="dev mixes (benchmarks/dev_mixes.py), every row")
    parser.add_argument("--sst2", nargs="*", default=[],
                        help="SST-2 files, a seeded subset of --sst2-sample rows each")
    parser.add_argument("--sst2-sample", type=int, default=80)


def mixes(a: argparse.Namespace) -> Iterator[tuple[str, Callable[[], Sequence[dict]]]]:
    """(name, load) per mix of --mixes and --sst2; load() gives its examples (the SST-2 files'
    seed-0 subset, the same in every probe)."""
    for path, sample in [(m, None) for m in a.mixes] + [(s, a.sst2_sample) for s in a.sst2]:
        def load(path: str = path, sample: int | None = sample) -> Sequence[dict]:
            examples = load_examples(path, "train", "auto", None, False)
            return sample_rows(examples, sample, 0) if sample else examples
        yield Path(path).stem + (f"_n{sample}" if sample else ""), load


def computed_once(path: Path, compute: Callable[[], Any], write: Callable[[Path, Any], None],
                  read: Callable[[Path], Any], describe: Callable[[Any], str] = lambda _: "") -> Any:
    """`compute()` written to `path` (atomically: a temporary file beside it, then a rename)
    the first time, and read back from there on every later call and rerun."""
    if not path.exists():
        t0 = time.time()
        value = compute()
        tmp = path.with_name(path.name + ".tmp")  # outside the *.jsonl / *.npz a table reads
        write(tmp, value)
        tmp.replace(path)
        print(f"{path.stem}: {describe(value)}{time.time() - t0:.0f}s", flush=True)
    return read(path)


def rows_per_mix(out: Path, a: argparse.Namespace,
                 score: Callable[[Sequence[dict]], list[dict[str, Any]]],
                 suffix: str = "") -> dict[str, list[dict[str, Any]]]:
    """`score(examples)` for every mix, saved as OUT/<mix><suffix>.jsonl and read back from
    there on a rerun."""
    return {name: computed_once(out / f"{name}{suffix}.jsonl", lambda load=load: score(load()),
                                write_jsonl, read_jsonl, lambda rows: f"{len(rows)} rows, ")
            for name, load in mixes(a)}
