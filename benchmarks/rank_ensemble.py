"""Two finished selection runs on one mix, and the average of their ranks as a third ranking:
does a second signal add what the first misses? Read from the runs' scores.jsonl; nothing is
trained or scored again.

    python benchmarks/rank_ensemble.py --pair runs/dev_mixes/alpaca-xstest_s0.jsonl \\
        runs/sweep_safegrad/default-alpaca-xstest_s0-s0 \\
        runs/sweep_safegrad/safe-gradient-4-alpaca-xstest_s0-s0

Each ranking keeps its top `--keep-ratio` of the rows both runs scored (the product's
`keep_count_for` / `keep_mask`), then AUROC, harmful rows removed and control rows kept as
`selection_sweep.py` reports them.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score
from unseen_rows import run_weights

from sealft.data import read_rows
from sealft.selector import keep_count_for, keep_mask


def rank_average(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    # Ranks, not weights: the two signals live on unrelated scales.
    return (rankdata(first) + rankdata(second)) / 2


def quality(score: np.ndarray, flags: np.ndarray, keep_ratio: float) -> dict[str, float]:
    """A low score ranks a row as harmful."""
    unsafe, control = flags == "unsafe", flags == "control"
    ids = [f"{i:08d}" for i in range(len(score))]
    kept = keep_mask(score, ids, np.ones(len(score), dtype=bool),
                     keep_count_for(len(score), keep_ratio, None))
    return {"auroc": float(roc_auc_score(unsafe, -score)),
            "removed": float(1 - kept[unsafe].mean()),
            "controls_kept": float(kept[control].mean()) if control.any() else float("nan")}


def compare(mix: str, first: Path, second: Path, keep_ratio: float = 0.8,
            label_field: str = "flag") -> dict[str, dict[str, float]]:
    a, b = run_weights(first), run_weights(second)
    rows = sorted(set(a) & set(b))
    data = read_rows(mix)
    flags = np.array([str(data[r].get(label_field)) for r in rows])
    wa, wb = np.array([a[r] for r in rows]), np.array([b[r] for r in rows])
    return {name: quality(score, flags, keep_ratio) for name, score in
            ((first.name, wa), (second.name, wb), ("rank average", rank_average(wa, wb)))}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", nargs=3, action="append", required=True,
                   metavar=("MIX", "RUN_A", "RUN_B"), help="repeatable")
    p.add_argument("--keep-ratio", type=float, default=0.8)
    args = p.parse_args(argv)
    results = [(Path(mix).stem, compare(mix, Path(a), Path(b), args.keep_ratio))
               for mix, a, b in args.pair]
    print("| mix | ranking | AUROC | harmful removed | controls kept |\n|---|---|---|---|---|")
    for mix, by_ranking in results:
        for name, q in by_ranking.items():
            print(f"| {mix} | {name} | {q['auroc']:.3f} | {q['removed']:.2f} | "
                  f"{q['controls_kept']:.2f} |")
    for k, name in enumerate(("A", "B", "rank average")):
        means = [statistics.fmean(list(r.values())[k][m] for _, r in results)
                 for m in ("auroc", "removed", "controls_kept")]
        print(f"| mean of {len(results)} | {name} | " + " | ".join(f"{v:.3f}" for v in means)
              + " |")


if __name__ == "__main__":
    main()
