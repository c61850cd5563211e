"""Does SEAL keep an aligned model safe through fine-tuning? The paper's claim, end to end.

An aligned model (default: Qwen2.5-Coder-0.5B-Instruct, offline) is fine-tuned with LoRA on a
seeded sample of an SST-2 + BeaverTails mix (default p = 0.2: a fifth of the rows are harmful
questions with compliant answers) under each data choice — all rows, random 80%, DSIR 80%,
SEAL 80%, SEAL 80% + SafeInstr — and every resulting model, plus the untouched base model, is
evaluated on the same held-out prompts:

  refusal       harmful prompts from AdvBench and HarmBench (never seen by selection or
                training: SEAL's upper level, DSIR's target and SafeInstr's rows are the
                safety-tuned-llamas refusals)
  held-out      harmful questions of the fine-tuning file's own kind (BeaverTails): its unsafe
                rows outside the sample, which no cell selects from or trains on
  over-refusal  XSTest's safe prompts (refusing them is a failure)
  task          SST-2 validation accuracy

Everything runs through the product (`sealft.experiment.run_grid` for the grid,
`sealft.evaluate.evaluate` for the base model), so the run dir is an ordinary experiment dir
and a rerun resumes it. Trailing key=value pairs override ExperimentArgs options
(`finetune.lr=1e-5`, `method_select.seal.batch_size=64`, `evaluate.sample=100`, ...).

    HF_HUB_OFFLINE=1 python benchmarks/end_to_end.py --output-dir runs/end_to_end \\
        --output docs/end_to_end_table.md
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from sealft import config as cfg
from sealft.data import load_examples, sample_rows
from sealft.evaluate import EvaluateArgs, evaluate
from sealft.experiment import ExperimentArgs, run_grid
from sealft.io import read_jsonl, write_jsonl

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
QWEN = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
METHODS = ("all", "random", "dsir", "seal", "seal+safeinstr")
HELDOUT = "heldout_harmful"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=QWEN)
    parser.add_argument("--finetune-data", default=str(DATA / "finetune" / "sst2_n1000_p0.2.json"))
    parser.add_argument("--sample", type=int, default=120, help="fine-tuning rows (seeded)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--keep-ratio", type=float, default=0.8)
    parser.add_argument("--seeds", default="0", help="comma-separated")
    parser.add_argument("--harmful-per-set", type=int, default=50,
                        help="prompts from each of AdvBench and HarmBench (seeded)")
    parser.add_argument("--xstest", type=int, default=50, help="XSTest safe prompts")
    parser.add_argument("--sst2", type=int, default=100, help="SST-2 validation rows")
    parser.add_argument("--heldout", type=int, default=100,
                        help="held-out harmful questions of the fine-tuning file (seeded)")
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs")
    parser.add_argument("--lr", type=float, default=5e-4, help="fine-tuning LoRA learning rate")
    parser.add_argument("--lora-targets",
                        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                        help="LoRA target modules of the fine-tuning (SEAL's selection keeps "
                             "q_proj,v_proj, as measured in docs/selection.md)")
    parser.add_argument("--output-dir", default="runs/end_to_end")
    parser.add_argument("--output", default=None, help="also write the table to this .md")
    parser.add_argument("overrides", nargs="*", help="ExperimentArgs options as key=value")
    args = parser.parse_args(argv)
    for path in (args.finetune_data, DATA / "safe" / "safetyllamas_safety_only.json"):
        if not Path(path).exists():
            parser.error(f"missing data {path}: expected ../shared/data next to the repository")
    return args


def experiment_options(args: argparse.Namespace) -> dict[str, Any]:
    """The grid's settings. Deviations from the paper, for a CPU budget: a sample of the rows,
    and a stronger fine-tuning than the paper's (LoRA on every linear layer, lr 5e-4, batch 8):
    measured here, LoRA on q/v at lr 2e-4 for 40 steps on 160 rows with 32 harmful ones left
    Qwen's refusal rate where it was (56% -> 59%), so there was no erosion for any selection to
    prevent. The paper's 1e-5 with batch 64 makes ~4 steps on 120 rows."""
    refusals = str(DATA / "safe" / "safetyllamas_safety_only.json")
    return {
        "output_dir": args.output_dir,
        "model": args.model,
        "finetune_data": args.finetune_data,
        "safe_data": refusals,
        "safeinstr_data": refusals,
        "safeinstr_k": max(1, args.sample // 10),  # ~10%, as in SafeInstr's 3-10% mixes
        "methods": [m.strip() for m in args.methods.split(",") if m.strip()],
        "keep_ratios": [args.keep_ratio],
        "seeds": [int(s) for s in args.seeds.split(",")],
        "select": {"sample": args.sample, "safe_sample": 200, "label_field": "flag",
                   "max_length": 192},
        # SEAL's default (the paper's Algorithm 2 on the safe set of refusals) with the settings
        # measured in docs/selection.md: one epoch of batches of 16, γ > 0 from the start.
        "method_select": {"seal": {
            "epochs": 1, "batch_size": 16, "micro_batch_size": 8, "safe_batch_size": 16,
            "lr": 1e-4, "selector_lr": 5e-3, "gamma_start": 0.05}},
        "finetune": {"epochs": args.epochs, "batch_size": 8, "micro_batch_size": 8,
                     "lr": args.lr, "lora_target_modules": args.lora_targets.split(",")},
        "evaluate": evaluate_options(args),
        "plot": False,
    }


def evaluate_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"suite": "safety,overrefusal,task", "safety_sets": ["advbench", "harmbench"],
            "sample": args.harmful_per_set,
            "suite_samples": [f"overrefusal={args.xstest}", f"task={args.sst2}"],
            "max_new_tokens": 32, "task_max_new_tokens": 4, "batch_size": 16,
            "show_progress": False}


def evaluate_base(exp: ExperimentArgs) -> dict[str, Any]:
    """The untouched model on the same prompts (same seed, same limits as every cell)."""
    folder = Path(exp.output_dir) / "base_eval"
    if not (folder / "summary.json").exists():
        evaluate(cfg.build(EvaluateArgs, exp.evaluate, {
            "model": exp.model, "label": "base", "output_dir": str(folder), "resume": True}))
    return json.loads((folder / "summary.json").read_text(encoding="utf-8"))


def heldout_harmful_prompts(args: argparse.Namespace, exp: ExperimentArgs) -> Path:
    """The fine-tuning file's harmful questions that no cell sees: unsafe rows outside every
    seed's sample, without the Alpaca wrapper. Refusing them measures what fine-tuning on that
    kind of data did to the model, on questions it never trained on."""
    examples = load_examples(args.finetune_data)
    seen = set()
    for seed in exp.seeds:
        seen |= {e["id"] for e in sample_rows(examples, args.sample, seed)}
    rows = [{"id": e["id"], "prompt": _question(e["messages"][-2]["content"])}
            for e in examples if e["meta"].get("flag") == "unsafe" and e["id"] not in seen]
    path = Path(exp.output_dir) / "heldout_harmful.jsonl"
    write_jsonl(path, rows)
    return path


def _question(text: str) -> str:
    wrapped = re.search(r"### Instruction:\n(.*?)\n\n### Response:", text, re.S)
    return (wrapped.group(1) if wrapped else text).strip()


def evaluate_heldout(args: argparse.Namespace, exp: ExperimentArgs, prompts: Path,
                     rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Refusal rate on the held-out questions for the base model ("base") and every finished
    cell (by cell dir); each evaluation is cached in its own dir and resumes."""
    targets = {"base": (None, Path(exp.output_dir) / "base_eval_heldout")}
    for row in rows:
        if row["status"] == "ok":
            cell = Path(row["cell_dir"])
            targets[row["cell_dir"]] = (str(cell / "finetune" / "adapter"), cell / "eval_heldout")
    rates = {}
    for key, (adapter, folder) in targets.items():
        if not (folder / "summary.json").exists():
            generation = {k: exp.evaluate[k] for k in ("max_new_tokens", "batch_size", "show_progress")}
            evaluate(cfg.build(EvaluateArgs, generation, {
                "model": exp.model, "adapter": adapter, "suite": "custom", "label": key,
                "prompt_files": [f"{HELDOUT}={prompts}#prompt"], "sample": args.heldout,
                "output_dir": str(folder), "resume": True}))
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        rates[key] = summary["refusal_by_set"].get(HELDOUT)
    return rates


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _secs(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def table(base: dict[str, Any], rows: list[dict[str, Any]],
          heldout: dict[str, float | None]) -> str:
    head = ("| data | rows trained | harmful rows trained | refusal % (Δ base) | held-out "
            "harmful refusal % (Δ base) | over-refusal % | SST-2 acc. % | select s | "
            "fine-tune s | eval s |")
    lines = [head, "|" + "---|" * 10]
    base_refusal, base_heldout = base.get("safety_refusal_rate"), heldout.get("base")
    lines.append(f"| base model (no fine-tuning) | 0 | 0 | {_pct(base_refusal)} | "
                 f"{_pct(base_heldout)} | {_pct(base.get('over_refusal_rate'))} | "
                 f"{_pct(base.get('task_accuracy'))} | – | – | {_secs(base.get('wall_seconds'))} |")
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['method']} | failed: {row['error']} |" + " |" * 8)
            continue
        trained, harmful = trained_rows(Path(row["cell_dir"]))
        name = row["method"] if row["method"] == "all" else f"{row['method']} {row['keep_ratio']:g}"
        lines.append(
            f"| {name} | {trained} | {harmful} | "
            f"{_with_delta(row['safety_refusal_rate'], base_refusal)} | "
            f"{_with_delta(heldout.get(row['cell_dir']), base_heldout)} | "
            f"{_pct(row['over_refusal_rate'])} | {_pct(row['task_accuracy'])} | "
            f"{_secs(row['select_seconds'])} | {_secs(row['finetune_seconds'])} | "
            f"{_secs(row['evaluate_seconds'])} |")
    return "\n".join(lines) + "\n"


def _with_delta(value: float | None, base: float | None) -> str:
    if value is None or base is None:
        return _pct(value)
    return f"{_pct(value)} ({100 * (value - base):+.1f})"


def trained_rows(cell_dir: Path) -> tuple[int, int]:
    """Rows in the fine-tuning file of a cell, and how many of them carry the unsafe flag."""
    mixed = cell_dir / "select" / "selected_safeinstr.jsonl"
    path = mixed if mixed.exists() else cell_dir / "select" / "selected.jsonl"
    rows = read_jsonl(path)
    return len(rows), sum(r.get("flag") == "unsafe" for r in rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = experiment_options(args)
    exp = cfg.build(ExperimentArgs, options, cfg.parse_overrides(args.overrides))
    started = time.perf_counter()
    rows = run_grid(exp)
    base = evaluate_base(exp)
    heldout = evaluate_heldout(args, exp, heldout_harmful_prompts(args, exp), rows)
    text = table(base, rows, heldout)
    minutes = (time.perf_counter() - started) / 60
    print(text)
    print(f"total wall time of this call: {minutes:.1f} min", file=sys.stderr)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
