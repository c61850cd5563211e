"""Held-out task rows for the erosion cells' `task-loss` (`erosion_overrefusal.py --task-data`):
rows of the benign file that no seed's training mix holds, a seeded sample of them.

    python benchmarks/heldout_task_rows.py --benign-data ../shared/data/benign/alpaca_en_demo.json \\
        --rows 32 --harmful 0 --seeds 0 1 2 --n 40 --out runs/erosion_B_task.json

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


def row_key(row: dict) -> str:
    return json.dumps([row["instruction"], row.get("input", ""), row["output"]])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benign-data", required=True)
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--harmful", type=int, default=16)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n", type=int, default=40, help="rows to hold out")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    trained: set[str] = set()
    for seed in a.seeds:
        mix_args = erosion_curve.parse_args(["--benign-data", a.benign_data, "--rows", str(a.rows),
                                             "--harmful", str(a.harmful), "--seed", str(seed)])
        with tempfile.TemporaryDirectory() as folder:
            train, _ = erosion_curve.build_data(mix_args, Path(folder))
            trained |= {row_key(r) for r in json.loads(train.read_text(encoding="utf-8"))}
    rows = json.loads(Path(a.benign_data).read_text(encoding="utf-8"))
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
