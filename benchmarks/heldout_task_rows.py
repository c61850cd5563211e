"""Held-out task rows for the erosion cells' `task-loss` (`erosion_overrefusal.py --task-data`):
rows of the benign file that no seed's training mix holds, a seeded sample of them.

    python benchmarks/heldout_task_rows.py --benign-data ../shared/data/benign/alpaca_en_demo.json \\
        --rows 32 --harmful 0 --seeds 0 1 2 --n 40 --out runs/erosion_B_task.json

With `--finetune-data FILE` instead, the mixes draw both kinds of rows from one flagged file
(as `erosion_curve.py --finetune-data FILE` does) and the held-out rows are its unflagged ones.

The mixes are rebuilt exactly as `erosion_curve.py` builds them (same flags, same seeds), in a
temporary folder; nothing of a run is read or written.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import erosion_curve

from sealft.data import read_rows


def row_key(row: dict) -> str:
    return json.dumps([row["instruction"], row.get("input", ""), row["output"]])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--benign-data", help="the benign rows' own file")
    source.add_argument("--finetune-data", help="one file with both kinds of rows (`flag`)")
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--harmful", type=int, default=16)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n", type=int, default=40, help="rows to hold out")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    source = (["--benign-data", a.benign_data] if a.benign_data
              else ["--finetune-data", a.finetune_data])
    trained: set[str] = set()
    for seed in a.seeds:
        mix_args = erosion_curve.parse_args([*source, "--rows", str(a.rows),
                                             "--harmful", str(a.harmful), "--seed", str(seed)])
        with tempfile.TemporaryDirectory() as folder:
            train, _ = erosion_curve.build_data(mix_args, Path(folder))
            trained |= {row_key(r) for r in json.loads(train.read_text(encoding="utf-8"))}
    rows = (read_rows(a.benign_data) if a.benign_data
            else [r for r in read_rows(a.finetune_data) if r.get("flag") != "unsafe"])
    rest = [r for r in rows if row_key(r) not in trained]
    picked = random.Random(0).sample(rest, a.n)
    out = Path(a.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(picked, indent=1), encoding="utf-8")
    tmp.replace(out)
    print(f"{out}: {len(picked)} of the {len(rest)} rows outside seeds {a.seeds}' mixes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
