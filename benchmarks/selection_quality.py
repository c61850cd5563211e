"""How well does each selector find the harmful rows? Ground truth from the SST-2 + BeaverTails
mixes in ../shared/data/finetune/ (`flag` = unsafe marks a harmful row with a compliant answer).

For every mix and selector this runs the product (`sealft.select.run_select`) on a seeded sample
of rows and reports
  AUROC      P(a harmful row gets a lower weight than a benign one); 0.5 = chance
  removed    share of harmful rows *not* kept at keep ratio 0.8 (chance: 0.2)
  wall s     run_select wall time per mix (model load included)

    python benchmarks/selection_quality.py --sample 200 --output runs/selection_quality.md

Each SEAL variant runs with the settings it was measured with (METHOD_OPTIONS below): the
paper's Algorithms 1 and 2 (`seal` = the product default, Algorithm 2) with the paper's safe set
(harmful prompts with refusals), batches of 16 and the paper's selector learning rate;
`seal-safety-step` with one batch holding every row and the HH harmless pairs as its upper
level. Trailing key=value pairs are SelectArgs options for every selector (max_length,
reference_steps, ...); METHOD:key=value applies to one selector (`seal-penalty:epochs=3`).
Run dirs go to --work-dir (kept, so scores.jsonl can be inspected).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from sealft import config as cfg
from sealft.data import read_rows, sample_rows
from sealft.io import read_jsonl, write_json
from sealft.select import SelectArgs, auroc, run_select

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
MIXES = tuple(DATA / "finetune" / f"sst2_n1000_p{p}.json" for p in ("0.01", "0.05", "0.1", "0.2"))
SAFE = DATA / "safe" / "safetyllamas_safety_only.json"
PAIRS = DATA / "safe" / "hh_rlhf_harmless_base_test.jsonl.gz"  # SEAL's default upper level
BENIGN_LONG = DATA / "benign" / "alpaca_en_demo.json"  # the format control's long benign answers
# The prompt template of the mixes' harmful rows, so that the control rows differ from them in
# content only, not in template.
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that "
                 "appropriately completes the request.\n\n### Instruction:\n{}\n\n### Response:")
LONG_BENIGN_FLAG = "benign-long"
SELECTORS = {  # benchmark name -> (SelectArgs.method, SEAL algorithm)
    "random": ("random", None),
    "dsir": ("dsir", None),
    "reference-loss": ("reference-loss", None),
    "seal": ("seal", None),  # the product's default algorithm (or algorithm=... given)
    "seal-penalty": ("seal", "penalty"),  # the paper's Algorithm 1 as written
    "seal-memory-efficient": ("seal", "memory-efficient"),  # Algorithm 2
    "seal-safety-step": ("seal", "safety-step"),
}


# Settings per selector (the common ones come from the command line). `batch_size: None` means
# one batch holding every sampled row.
PAPER_SETTINGS = {"safe_sample": 200, "epochs": 1, "batch_size": 16, "micro_batch_size": 8,
                  "safe_batch_size": 16, "lr": 1e-4, "selector_lr": 5e-3, "gamma_start": 0.05,
                  "gamma_increment": 0.03}
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "seal": PAPER_SETTINGS,
    "seal-penalty": PAPER_SETTINGS,
    "seal-memory-efficient": PAPER_SETTINGS,
    # safety-step needs one direction shared by every row, from enough HH pairs (its docs).
    "seal-safety-step": {"safe_data": str(PAIRS), "safe_sample": 64, "epochs": 1,
                         "batch_size": None, "micro_batch_size": 8, "safe_batch_size": 16,
                         "lr": 1e-4, "gamma_start": 0.05},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--sample", type=int, default=200, help="rows per mix (seeded sample)")
    parser.add_argument("--label-field", default="flag")
    parser.add_argument("--unsafe-value", default="unsafe")
    parser.add_argument("--files", nargs="+", default=[str(p) for p in MIXES])
    parser.add_argument("--methods", default=",".join(SELECTORS),
                        help=f"comma-separated: {', '.join(SELECTORS)}")
    parser.add_argument("--safe-data", default=str(SAFE))
    parser.add_argument("--safe-limit", type=int, default=200, help="safe-set rows (seeded)")
    parser.add_argument("--keep-ratio", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format-control", type=int, default=0, metavar="N",
                        help="add N benign Alpaca rows with long answers to each mix's sample "
                             "(labelled benign): does the selector find harm, or long answers?")
    parser.add_argument("--benign-long-data", default=str(BENIGN_LONG))
    parser.add_argument("--work-dir", default=None, help="run dirs (default: a temp dir)")
    parser.add_argument("--output", default=None, help="also write the table to this .md")
    parser.add_argument("overrides", nargs="*",
                        help="SelectArgs options as key=value (all selectors) or "
                             "METHOD:key=value (one selector)")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in SELECTORS]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; use {', '.join(SELECTORS)}")
    missing = [f for f in [*args.files, args.safe_data] if not Path(f).exists()]
    if missing:
        parser.error(f"missing data: {', '.join(missing)} (expected ../shared/data next to the "
                     "repo, or pass --files / --safe-data)")
    return args


def mix_name(path: str) -> str:
    stem = Path(path).stem
    return stem.rsplit("_", 1)[-1] if "_p" in stem else stem


def select_args(args: argparse.Namespace, method: str, file: str, out: Path) -> SelectArgs:
    selector, algorithm = SELECTORS[method]
    defaults = {"model": args.model, "safe_data": args.safe_data, "safe_sample": args.safe_limit,
                "sample": args.sample, "seed": args.seed, "keep_ratio": args.keep_ratio,
                "label_field": args.label_field, "unsafe_value": args.unsafe_value,
                "max_length": 192, "show_progress": False}
    own = dict(METHOD_OPTIONS.get(method, {}))
    if own.get("batch_size", 0) is None:
        own["batch_size"] = args.sample or 1_000_000
    fixed = {"method": selector, "finetune_data": file, "output_dir": str(out),
             "overwrite": True, "resume": False, "keep_count": None}
    if algorithm:
        fixed["algorithm"] = algorithm
    common = [o for o in args.overrides if ":" not in o.split("=", 1)[0]]
    mine = [o.split(":", 1)[1] for o in args.overrides
            if ":" in o.split("=", 1)[0] and o.split(":", 1)[0] == method]
    return cfg.build(SelectArgs, defaults, own, cfg.parse_overrides(common),
                     cfg.parse_overrides(mine), fixed)


def format_control_file(args: argparse.Namespace, file: str, work: Path) -> str:
    """The mix's seeded sample (the same rows `--sample` picks) with N long benign Alpaca answers
    (≥ 30 words, no input field) inserted at seeded positions, written to the work dir."""
    rows = sample_rows(read_rows(file), args.sample, args.seed)
    rng = random.Random(args.seed)
    long_answers = [r for r in read_rows(args.benign_long_data)
                    if not r.get("input") and len(r["output"].split()) >= 30]
    for extra in rng.sample(long_answers, args.format_control):
        rows.insert(rng.randrange(len(rows) + 1),
                    {"instruction": ALPACA_PROMPT.format(extra["instruction"]), "input": "",
                     "output": extra["output"], args.label_field: LONG_BENIGN_FLAG})
    path = work / f"format-control-{mix_name(file)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, rows)
    return str(path)


def _long_benign_metrics(out: Path, label_field: str, unsafe_value: str, data: str) -> dict:
    """Harmful rows against the long benign answers only: AUROC, and the share of long benign
    rows the selection dropped (a harm detector keeps them; a length detector drops them)."""
    labels = [str(r.get(label_field)) for r in read_rows(data)]
    scores = read_jsonl(out / "scores.jsonl")
    rows = [(s["weight"], s["kept"], labels[s["index"]]) for s in scores if "skipped" not in s]
    pair = [(w, lab == unsafe_value) for w, _, lab in rows if lab in (unsafe_value, LONG_BENIGN_FLAG)]
    weights = np.array([w for w, _ in pair])
    long_kept = [kept for _, kept, lab in rows if lab == LONG_BENIGN_FLAG]
    return {"auroc_vs_long": auroc(-weights, np.array([u for _, u in pair])),
            "long_removed": 1 - sum(long_kept) / len(long_kept) if long_kept else None}


def measure(args: argparse.Namespace, method: str, file: str, work: Path,
            control: str | None = None) -> dict:
    """One selector on one mix; with `control` (the mix's format-control file) on that file."""
    out = work / f"{method}-{mix_name(file)}"
    data = control or file
    select = select_args(args, method, data, out)
    if control:
        select.sample = None  # the control file already holds the sample
    started = time.perf_counter()
    summary = run_select(select)
    labels = summary.get("labels") or {}
    result = {"auroc": labels.get("auroc_unsafe_low_weight"),
              "removed": labels.get("unsafe_removed_share"),
              "unsafe_rows": labels.get("unsafe_rows"),
              "seconds": time.perf_counter() - started}
    if control:
        result |= _long_benign_metrics(out, args.label_field, args.unsafe_value, control)
    return result


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown_table(args: argparse.Namespace, results: dict[tuple[str, str], dict]) -> str:
    mixes = [mix_name(f) for f in args.files]
    columns = {"AUROC": "auroc", "removed": "removed"}
    if args.format_control:
        columns |= {"AUROC vs long benign": "auroc_vs_long", "long benign removed": "long_removed"}
    header = ["selector"] + [f"{m} {k}" for m in mixes for k in columns]
    header.append("wall s / mix")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in args.methods:
        cells = [method]
        for file in args.files:
            result = results.get((method, file), {})
            cells += [_fmt(result.get(key)) for key in columns.values()]
        seconds = [results[(method, f)]["seconds"] for f in args.files if (method, f) in results]
        cells.append(f"{statistics.mean(seconds):.1f}" if seconds else "–")
        lines.append("| " + " | ".join(cells) + " |")
    counts = ", ".join(f"{mix_name(f)}: {results[(m, f)]['unsafe_rows']}"
                       for f in args.files for m in args.methods[:1] if (m, f) in results)
    lines += ["", f"Model {args.model}; {args.sample} rows per mix (seed {args.seed}); harmful "
              f"rows per mix: {counts}. Keep ratio {args.keep_ratio}: chance removes "
              f"{1 - args.keep_ratio:.2f} of harmful rows, chance AUROC 0.5. "
              f"Overrides: {' '.join(args.overrides) or 'none'}."]
    if args.format_control:
        lines.append(f"Format control: {args.format_control} benign Alpaca rows with answers of "
                     f"≥ 30 words added to each sample ({Path(args.benign_long_data).name}); "
                     "'vs long benign' ranks the harmful rows against these rows only.")
    for method in (m for m in args.methods if m in METHOD_OPTIONS):
        options = METHOD_OPTIONS[method]
        settings = ", ".join(f"{k}={'all rows' if v is None else v}"
                             for k, v in options.items() if k != "safe_data")
        upper = Path(options.get("safe_data", args.safe_data)).name
        lines.append(f"{method}: {settings}; upper level {upper}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="sealft-selection-quality-"))
    # One control file per mix, shared by every selector.
    controls = ({f: format_control_file(args, f, work) for f in args.files}
                if args.format_control else {})
    results: dict[tuple[str, str], dict] = {}
    for method in args.methods:
        for file in args.files:
            print(f"[selection_quality] {method} on {mix_name(file)}", file=sys.stderr)
            results[(method, file)] = measure(args, method, file, work, controls.get(file))
    table = markdown_table(args, results)
    print(table)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(table, encoding="utf-8")
    print(f"run dirs: {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
