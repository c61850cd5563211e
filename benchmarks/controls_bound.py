"""Research script (not the product): what share of the controls would a *perfect* harm
ranking keep?

At keep 0.8 a dev mix of 220 rows drops 44: its 20 harmful rows and 24 more. A ranking that puts
every harmful row first and every row whose answer is a refusal last (the product's gate), and
knows nothing else, draws those 24 at random from the rest, controls and benign rows alike. The
number of controls it drops is then hypergeometric; the target "≥ 95% of controls kept" allows
one of 20. This prints, per mix, the expected share kept and the chance of meeting the target,
so that a control count can be read against what harm detection alone can reach.

    python benchmarks/controls_bound.py runs/dev_mixes/*.jsonl --runs runs/sweep_neighbours
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
from scipy.stats import hypergeom

from sealft.io import read_jsonl
from sealft.refusal import is_refusal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from judge_probe import dropped_at  # noqa: E402
from label_audit import read_back  # noqa: E402


def bound(flags: list[str], refuses: list[bool], keep: float, target: float) -> dict:
    """Controls kept by a ranking with every harmful row first, every refusal last and the rest
    in random order: the expected share, and the chance that at least `target` of them stay."""
    n = len(flags)
    dropped = n - int(round(keep * n))
    harmful = sum(f == "unsafe" for f in flags)
    controls = sum(f == "control" for f in flags)
    open_controls = sum(f == "control" and not r for f, r in zip(flags, refuses, strict=True))
    pool = sum(f != "unsafe" and not r for f, r in zip(flags, refuses, strict=True))
    extra = max(dropped - harmful, 0)
    allowed = math.floor(controls * (1 - target) + 1e-9)
    drawn = min(extra, pool)
    draws = hypergeom(pool, open_controls, drawn)
    return {"rows": n, "dropped": dropped, "harmful": harmful, "controls": controls,
            "gated_controls": controls - open_controls, "pool": pool,
            "expected_kept": 1 - drawn * open_controls / pool / controls,
            "p_target": float(draws.cdf(allowed))}


def run_of(mix: Path, runs: Path | None) -> Path | None:
    """The `--neighbour-weight 0.5` run of `mix` in a sweep's folder, if there is one."""
    found = sorted(runs.glob(f"*-{mix.stem}-*/scores.jsonl")) if runs else []
    return found[0].parent if found else None


def kept_shares(data: list[dict], rankings: dict[str, np.ndarray], keep: float) -> dict[str, tuple]:
    """(controls kept, benign rows kept) at `keep` under each ranking of the rows `data`."""
    flags = np.array([d["flag"] for d in data])
    return {name: tuple((~dropped_at(score, keep)[flags == f]).mean() for f in ("control", "benign"))
            for name, score in rankings.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mixes", nargs="+", type=Path)
    p.add_argument("--runs", type=Path, help="a sweep's folder of --neighbour-weight 0.5 runs: "
                   "use the rows they scored, and show their rankings' controls and benign "
                   "rows kept")
    p.add_argument("--near", type=Path, default=Path("runs/neighbour_probe"))
    p.add_argument("--keep", type=float, default=0.8)
    p.add_argument("--target", type=float, default=0.95)
    a = p.parse_args()
    print("| mix | rows / dropped | harmful | controls (gated) | perfect ranking: expected "
          f"controls kept | P(≥ {a.target:.0%} kept) | default: controls / benign kept | "
          "w = 0.5: controls / benign kept |\n" + "|---" * 8 + "|")
    chance = 1.0
    for mix in a.mixes:
        run, rows, shares = run_of(mix, a.runs), read_jsonl(mix), {}
        if run is not None:  # the rows the product scored (a prompt over max_length is skipped)
            rows, mixed, margin, _ = read_back(mix, run, a.near)
            shares = kept_shares(rows, {"default": margin, "w = 0.5": mixed}, a.keep)
        b = bound([r["flag"] for r in rows], [is_refusal(r["output"]) for r in rows],
                  a.keep, a.target)
        chance *= b["p_target"]
        cells = [" / ".join(f"{x:.2f}" for x in shares[k]) if k in shares else "–"
                 for k in ("default", "w = 0.5")]
        print(f"| {mix.stem} | {b['rows']} / {b['dropped']} | {b['harmful']} | {b['controls']} "
              f"({b['gated_controls']}) | {b['expected_kept']:.3f} | {b['p_target']:.3f} | "
              + " | ".join(cells) + " |")
    print(f"\nP(target met on all {len(a.mixes)} mixes at once): {chance:.4f}")


if __name__ == "__main__":
    main()
