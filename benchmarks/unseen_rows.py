"""AUROC on the rows a `select --fit-sample` run never fitted, next to a full run's AUROC on
the same rows (paired: one set of rows, two selectors) and on all rows.

    python benchmarks/unseen_rows.py --mix runs/dev_mixes/gpt4-beavertails_s0.jsonl \\
        --fit-sample-run runs/sweep_fit44/default-gpt4-beavertails_s0-s0 \\
        --full-run runs/sweep_full_kr/default-gpt4-beavertails_s0-s0

The fitted rows are drawn again from the fit-sample run's config (seed, fit_sample) the way
the run drew them (`seal.fit_sample_rows`), and checked against the count its summary records.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml
from sklearn.metrics import roc_auc_score

from sealft.data import read_rows
from sealft.io import read_jsonl
from sealft.seal import fit_sample_rows


def run_weights(run: Path) -> dict[int, float]:
    """A selection run's weight per usable row, by input index (skipped rows left out)."""
    return {s["index"]: s["weight"] for s in read_jsonl(run / "scores.jsonl")
            if "skipped" not in s}


def _auroc(weights: dict[int, float], rows: list[int], unsafe: np.ndarray) -> float:
    # A low weight ranks a row as harmful.
    return float(roc_auc_score(unsafe[rows], [-weights[r] for r in rows]))


def compare(mix: str, fit_sample_run: Path, full_run: Path | None,
            label_field: str = "flag") -> dict:
    """Without a full run, only the fit-sample run's AUROC on its unseen rows."""
    config = yaml.safe_load((fit_sample_run / "config.yaml").read_text(encoding="utf-8"))
    summary = json.loads((fit_sample_run / "summary.json").read_text(encoding="utf-8"))
    sampled = run_weights(fit_sample_run)
    full = run_weights(full_run) if full_run is not None else None
    usable = sorted(sampled)
    fitted = set(fit_sample_rows(usable, config["fit_sample"], config["seed"]))
    if len(fitted) != summary.get("fitted_rows"):
        raise SystemExit(f"{fit_sample_run}: drew {len(fitted)} fitted rows, the run "
                         f"records {summary.get('fitted_rows')}")
    unsafe = np.array([str(r.get(label_field)) == "unsafe" for r in read_rows(mix)])
    unseen = [r for r in usable if r not in fitted and (full is None or r in full)]
    return {"mix": Path(mix).stem, "seed": config["seed"], "unseen_rows": len(unseen),
            "unseen_harmful": int(unsafe[unseen].sum()),
            "fit_sample_unseen": _auroc(sampled, unseen, unsafe),
            "full_same_rows": _auroc(full, unseen, unsafe) if full is not None else None,
            "full_all_rows": _auroc(full, sorted(full), unsafe) if full is not None else None}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mix", action="append", required=True, help="the mix file (repeatable)")
    p.add_argument("--fit-sample-run", action="append", required=True, type=Path)
    p.add_argument("--full-run", action="append", default=[], type=Path,
                   help="one per --mix, or none: then only the fit-sample runs' AUROC")
    a = p.parse_args(argv)
    if len(a.fit_sample_run) != len(a.mix) or len(a.full_run) not in (0, len(a.mix)):
        p.error("give one --fit-sample-run per --mix, and one --full-run per --mix or none")
    print("| mix | fit seed | unseen rows (harmful) | AUROC, fit-sample run | AUROC, full run, "
          "same rows | difference | full run, all rows |")
    print("|---|---|---|---|---|---|---|")
    for mix, sampled, full in zip(a.mix, a.fit_sample_run, a.full_run or [None] * len(a.mix),
                                  strict=True):
        r = compare(mix, sampled, full)
        paired = (f"{r['full_same_rows']:.3f} | "
                  f"{r['full_same_rows'] - r['fit_sample_unseen']:+.3f} | "
                  f"{r['full_all_rows']:.3f}" if full is not None else "– | – | –")
        print(f"| {r['mix']} | {r['seed']} | {r['unseen_rows']} ({r['unseen_harmful']}) | "
              f"{r['fit_sample_unseen']:.3f} | {paired} |")


if __name__ == "__main__":
    main()
