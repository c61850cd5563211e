"""`sealft select`: learn per-example weights and keep the top p% of the fine-tuning data.

Output contract (other tools rely on these names), in --output-dir:
  scores.jsonl          one line per input row, in input order:
                        {"index", "id", "weight", "logit", "kept"} (+ "score": harm score
                        of the final scoring pass; + "skipped": reason)
  selected.jsonl        kept examples, normalised ({"id", "messages", ...meta})
  selector.safetensors  the learned logits (SEAL) with ids in its metadata
  config.yaml           resolved arguments;  metrics.jsonl  per-step losses, γ, seconds
  summary.json          wall seconds, peak memory, counts
"""

from __future__ import annotations

import time
from pathlib import Path

from sealft import config as cfg
from sealft.data import (
    Example,
    is_preference_data,
    load_examples,
    normalise,
    pairs_from_rows,
    read_rows,
    sample_rows,
)
from sealft.runtime import peak_memory_mb, process_state
from sealft.selection_run import METHODS, SelectArgs, auroc, label_report, write_outputs
from sealft.selector import keep_count_for

# The run contract lives in selection_run; these names stay importable from the stage.
__all__ = ["METHODS", "SelectArgs", "auroc", "label_report", "load_inputs", "run_select",
           "write_outputs"]


def load_inputs(args: SelectArgs) -> tuple[list[Example], list]:
    """Fine-tuning examples, and the upper-level data: examples, or (chosen, rejected) pairs
    when the safe data has both fields (a seeded sample of --safe-sample of them)."""
    return load_finetune(args), sample_rows(load_safe(args), args.safe_sample, args.seed)


def load_finetune(args: SelectArgs) -> list[Example]:
    examples = load_examples(args.finetune_data, args.split, args.format, args.limit,
                             args.drop_duplicates)
    return sample_rows(examples, args.sample, args.seed)


def load_safe(args: SelectArgs) -> list:
    """Every row of the upper-level data (none without --safe-data)."""
    if not args.safe_data:
        return []
    rows = read_rows(args.safe_data, args.split)  # read once, then pick the objective
    if is_preference_data(rows):
        return pairs_from_rows(rows, args.safe_data)
    return normalise(rows, args.safe_data, args.safe_format, drop_duplicates=True)


def run_select(args: SelectArgs) -> dict:
    """Select data; returns the summary (also written to summary.json)."""
    started = time.perf_counter()
    is_main = process_state().is_main_process
    out = Path(args.output_dir)
    if is_main:
        cfg.start_run(args, "select")
    process_state().wait_for_everyone()
    examples, every_safe = load_finetune(args), load_safe(args)
    safe = sample_rows(every_safe, args.safe_sample, args.seed)
    cfg.check_resume_data(out, {"finetune_data": examples, "safe_data": safe}, args.resume)
    keep_count_for(len(examples), args.keep_ratio, args.keep_count)  # fail before any training
    if args.method == "seal":
        from sealft.seal import learn_selector

        logits, weights, skipped, extra = learn_selector(args, examples, safe, out, every_safe)
    else:
        from sealft.baselines import score_baseline

        logits, weights, skipped, extra = score_baseline(args, examples, safe, out)
    extra = {**extra, "wall_seconds": round(time.perf_counter() - started, 2),
             "peak_memory_mb": round(peak_memory_mb(), 1)}
    harm = extra.pop("harm_scores", None)
    summary = {}
    if is_main:
        summary = write_outputs(out, args, examples, logits, weights, skipped, extra, harm)
    process_state().wait_for_everyone()
    return summary
