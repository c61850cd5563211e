"""Selector variants × mixes × seeded subsets, through the product (`run_select`), with the
controls that must be kept. One JSON line per run in --results (a rerun skips the runs already
there, so the sweep resumes), and a table of mean / min over seeds.

    python benchmarks/dev_mixes.py --out runs/dev_mixes
    python benchmarks/selection_sweep.py --mixes runs/dev_mixes/*.jsonl \
        --sst2 ../shared/data/finetune/sst2_n1000_p0.{05,1,2}.json --seeds 0 1 2 \
        --variants default,visits --results runs/sweep.jsonl

Metrics per run: AUROC (a lower weight singles out harmful rows, against every other row),
the share of harmful rows outside the kept 80%, the share of control rows kept, and AUROC of
harmful rows against the controls alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from sealft import config as cfg
from sealft.data import read_rows
from sealft.io import read_jsonl
from sealft.select import SelectArgs, run_select

REPO = Path(__file__).resolve().parents[1]
SAFE = REPO.parent / "shared" / "data" / "safe" / "safetyllamas_safety_only.json"
# The CPU settings the README recommends (the demo's), and the paper's budget.
CPU = {"epochs": 1, "batch_size": 16, "safe_batch_size": 16, "micro_batch_size": 8, "lr": 1e-4,
       "selector_lr": 5e-3, "gamma_start": 0.05, "gamma_increment": 0.03, "max_length": 192,
       "safe_sample": 200}
PAPER = CPU | {"epochs": 3, "batch_size": 64, "safe_batch_size": 64, "lr": 1e-5,
               "gamma_start": 0.0}
VARIANTS = {
    "default": CPU,
    "visits": CPU | {"scoring": "visits"},
    "paper-budget": PAPER,
    "visits-paper-budget": PAPER | {"scoring": "visits"},
    "margin-4-tokens": CPU | {"score_tokens": 4},
    "loss-8-tokens": CPU | {"score_signal": "loss", "score_tokens": 8},
    "loss-shift-8-tokens": CPU | {"score_signal": "loss-shift", "score_tokens": 8},
    "strong-safety-pull": CPU | {"epochs": 3, "lr": 1e-3},
    "safe-gradient-1": CPU | {"score_signal": "safe-gradient", "score_tokens": 1},
    "safe-gradient-4": CPU | {"score_signal": "safe-gradient", "score_tokens": 4},
    "neighbours-0.5": CPU | {"neighbour_weight": 0.5},
    "random": {"method": "random", "max_length": 192},
    "dsir": {"method": "dsir", "max_length": 192},
}


def metrics(out: Path, data_rows: list[dict], label_field: str) -> dict:
    scores = read_jsonl(out / "scores.jsonl")
    usable = [s for s in scores if "skipped" not in s]
    flags = np.array([str(data_rows[s["index"]].get(label_field)) for s in usable])
    weight = np.array([s["weight"] for s in usable])
    kept = np.array([s["kept"] for s in usable])
    unsafe, control = flags == "unsafe", flags == "control"
    result = {"rows": len(usable), "unsafe": int(unsafe.sum()), "controls": int(control.sum()),
              "auroc": float(roc_auc_score(unsafe, -weight)) if 0 < unsafe.sum() < len(flags)
              else None,
              "removed": float(1 - kept[unsafe].mean()) if unsafe.any() else None,
              "controls_kept": float(kept[control].mean()) if control.any() else None}
    pair = unsafe | control
    if unsafe.any() and control.any():
        result["auroc_vs_controls"] = float(roc_auc_score(unsafe[pair], -weight[pair]))
    return result


def runs(args) -> list[tuple[str, str, int]]:
    """(variant, file, seed): dev mixes carry their seed in the name (…_s1.jsonl); SST-2 files
    are sampled with each seed."""
    out = []
    for variant in args.variants:
        for file in args.mixes:
            out.append((variant, file, int(Path(file).stem.rsplit("_s", 1)[-1])))
        for file in args.sst2:
            out += [(variant, file, seed) for seed in args.seeds]
    return out


def mix_label(file: str) -> str:
    stem = Path(file).stem
    return stem.rsplit("_s", 1)[0] if "_s" in stem and "sst2" not in stem else stem


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="Qwen/Qwen2.5-Coder-0.5B-Instruct")
    p.add_argument("--mixes", nargs="*", default=[], help="dev mix files (…_s<seed>.jsonl)")
    p.add_argument("--sst2", nargs="*", default=[], help="SST-2 mix files, sampled per seed")
    p.add_argument("--sample", type=int, default=200, help="SST-2 rows per seeded subset")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", default="default,visits")
    p.add_argument("--safe-data", default=str(SAFE))
    p.add_argument("--results", default="runs/sweep.jsonl")
    p.add_argument("--work-dir", default="runs/sweep")
    p.add_argument("--budget-seconds", type=float, default=None,
                   help="stop starting new runs after this many seconds")
    p.add_argument("overrides", nargs="*", help="SelectArgs key=value for every SEAL run")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    results = Path(args.results)
    done = {(r["variant"], r["file"], r["seed"]) for r in
            (read_jsonl(results) if results.exists() else [])}
    started = time.perf_counter()
    for variant, file, seed in runs(args):
        if (variant, file, seed) in done:
            continue
        if args.budget_seconds and time.perf_counter() - started > args.budget_seconds:
            print("[sweep] time budget spent; rerun to continue", file=sys.stderr)
            break
        out = Path(args.work_dir) / f"{variant}-{Path(file).stem}-s{seed}"
        own = dict(VARIANTS[variant])
        fixed = {"model": args.model, "finetune_data": file, "safe_data": args.safe_data,
                 "output_dir": str(out), "overwrite": True, "seed": seed,
                 "sample": args.sample if file in args.sst2 else None,
                 "label_field": "flag", "show_progress": False}
        common = cfg.parse_overrides(args.overrides) if own.get("method") is None else {}
        select = cfg.build(SelectArgs, own, common, fixed)
        t0 = time.perf_counter()
        summary = run_select(select)
        rows = read_rows(file)  # scores.jsonl's "index" is the row's place in the file
        record = {"variant": variant, "file": file, "seed": seed, "mix": mix_label(file),
                  "seconds": round(time.perf_counter() - t0, 1),
                  "train_seconds": summary.get("train_seconds"),
                  "score_seconds": summary.get("score_seconds"),
                  "steps": summary.get("steps"), "fitted_rows": summary.get("fitted_rows"),
                  **metrics(out, rows, "flag")}
        with results.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
    print(table(read_jsonl(results)))
    return 0


def _fmt(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{statistics.mean(values):.3f} ({min(values):.3f})"


def table(records: list[dict]) -> str:
    """Mean (min) over seeds per variant × mix."""
    mixes = sorted({r["mix"] for r in records})
    variants = list(dict.fromkeys(r["variant"] for r in records))
    lines = ["| variant | mix | seeds | AUROC | harmful removed | controls kept | "
             "AUROC vs controls | s / run |", "|---|---|---|---|---|---|---|---|"]
    for variant in variants:
        for mix in mixes:
            rs = [r for r in records if r["variant"] == variant and r["mix"] == mix]
            if rs:
                lines.append(
                    f"| {variant} | {mix} | {len(rs)} | {_fmt([r['auroc'] for r in rs])} | "
                    f"{_fmt([r['removed'] for r in rs])} | "
                    f"{_fmt([r.get('controls_kept') for r in rs])} | "
                    f"{_fmt([r.get('auroc_vs_controls') for r in rs])} | "
                    f"{statistics.mean(r['seconds'] for r in rs):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
