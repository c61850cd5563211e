"""Evaluate the offline base models on the acceptance slice of the benchmarks.

Per model: 100 AdvBench + 100 HarmBench prompts (refusal rate), 100 XSTest safe prompts
(over-refusal), 200 SST-2 validation rows (accuracy); greedy decoding, 64 new tokens (5 for
SST-2), keyword judge. Runs are resumable: rerunning the same command finishes what is missing.

    HF_HUB_OFFLINE=1 python benchmarks/eval_base_models.py --output-dir runs/base_eval

Writes one evaluation dir per model plus base_models.json / base_models.md (the table for
docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from sealft.evaluate import EvaluateArgs, evaluate

MODELS = ("HuggingFaceTB/SmolLM2-135M-Instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct")


def _guard_snapshot_cache() -> None:
    # Caching the dequantised GGUF weights is only a speed-up; if it fails (a transformers
    # version that refuses to save GGUF-loaded models) the evaluation must still run.
    import sealft.models as models

    original = models._cache_snapshot

    def tolerant(name, model):
        try:
            original(name, model)
        except ValueError as err:
            print(f"note: snapshot cache skipped for {name}: {str(err)[:120]}")

    models._cache_snapshot = tolerant


def run_model(model: str, out: Path, args: argparse.Namespace) -> dict:
    folder = out / model.split("/")[-1]
    started = time.perf_counter()
    metrics = evaluate(EvaluateArgs(
        model=model, suite="safety,overrefusal,task", output_dir=str(folder),
        safety_sets=("advbench", "harmbench"), sample=100, suite_samples=("task=200",),
        max_new_tokens=args.max_new_tokens, task_max_new_tokens=args.task_max_new_tokens,
        batch_size=args.batch_size, threads=args.threads, data_dir=args.data_dir,
        show_progress=not args.no_progress,
    ))
    seconds = time.perf_counter() - started
    suites = metrics["suites"]
    sets = suites["safety"]["sets"]
    return {
        "model": model, "dir": str(folder), "seconds_this_call": round(seconds, 1),
        "generation_seconds_total": metrics["timing"]["generation_seconds_total"],
        "peak_memory_mb": metrics["timing"]["peak_memory_mb"],
        "advbench_refusal": sets["advbench"]["refusal_rate"], "advbench_n": sets["advbench"]["n"],
        "harmbench_refusal": sets["harmbench"]["refusal_rate"],
        "harmbench_n": sets["harmbench"]["n"],
        "xstest_over_refusal": suites["overrefusal"]["overall"]["over_refusal_rate"],
        "xstest_n": suites["overrefusal"]["sets"]["xstest_safe"]["n"],
        "sst2_accuracy": suites["task"]["overall"]["accuracy"],
        "sst2_parse_failure_rate": suites["task"]["overall"]["parse_failure_rate"],
        "sst2_n": suites["task"]["sets"]["sst2"]["n"],
    }


def merge_rows(path: Path, rows: list[dict]) -> list[dict]:
    """Keep other models' rows from an earlier call (models may be run one per process)."""
    if not path.exists():
        return rows
    fresh = {r["model"] for r in rows}
    old = [r for r in json.loads(path.read_text())["rows"] if r["model"] not in fresh]
    return sorted(old + rows, key=lambda r: MODELS.index(r["model"])
                  if r["model"] in MODELS else len(MODELS))


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | AdvBench refusal (n) | HarmBench refusal (n) | XSTest over-refusal (n) | "
        "SST-2 accuracy (n) | SST-2 parse failures | generation time | peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['advbench_refusal']:.2f} ({r['advbench_n']}) | "
            f"{r['harmbench_refusal']:.2f} ({r['harmbench_n']}) | "
            f"{r['xstest_over_refusal']:.2f} ({r['xstest_n']}) | "
            f"{r['sst2_accuracy']:.3f} ({r['sst2_n']}) | {r['sst2_parse_failure_rate']:.3f} | "
            f"{r['generation_seconds_total'] / 60:.1f} min | {r['peak_memory_mb'] / 1024:.1f} GiB |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="runs/base_eval")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--task-max-new-tokens", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    _guard_snapshot_cache()
    out = Path(args.output_dir)
    rows = []
    for model in args.models:  # in order: the small model's numbers arrive first
        row = run_model(model, out, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
    env = {"python": platform.python_version(), "machine": platform.machine(),
           "threads": args.threads, "batch_size": args.batch_size,
           "max_new_tokens": args.max_new_tokens,
           "task_max_new_tokens": args.task_max_new_tokens}
    rows = merge_rows(out / "base_models.json", rows)
    (out / "base_models.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    (out / "base_models.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
