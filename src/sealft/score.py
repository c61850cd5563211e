"""`sealft score`: score rows a finished selection run never saw, with forward passes only.

A SEAL run with `--scoring final-pass` saves what its scoring pass needs in `scorer/`: the
final θ (a PEFT adapter) and `scoring.json` (signal, tokens, refusals, the fit rows' score
mean / spread and the highest harm score it kept). A new row's score is the same quantity the
fitted rows got: its harm signal under that θ (docs/selection.md, "scoring rows never seen").

Outputs in --output-dir follow `sealft select`'s contract: scores.jsonl (one line per input
row, in input order: index, id, weight, logit, score, kept[, skipped]), selected.jsonl,
config.yaml, summary.json.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sealft import config as cfg
from sealft.errors import ConfigError
from sealft.selection_run import SCORER_DIR, SCORING_FILE, SelectArgs, write_outputs


@dataclass
class ScoreArgs(cfg.RunOptions):
    selection: str = ""
    """A finished `sealft select` run dir (SEAL with --scoring final-pass)."""
    data: str = ""
    """Rows to score: any data file or dataset `sealft select` reads."""
    output_dir: str = ""
    """Run directory; must be empty unless --overwrite."""
    keep_ratio: float | None = None
    """Keep this share of the new rows (highest weight first); default: keep every row at
    or below the fitted run's harm threshold."""
    micro_batch_size: int = 8
    """Rows per forward pass."""
    limit: int | None = None
    """Use only the first N rows."""
    sample: int | None = None
    """Use a seeded random sample of N rows (input order kept)."""
    format: str = "auto"
    """Data format: auto | messages | sharegpt | prompt_completion | alpaca | orca | hh."""
    split: str = "train"
    """Split, for hub datasets and saved DatasetDicts."""
    drop_duplicates: bool = False
    """Drop exact duplicate rows (without an id) instead of failing."""
    label_field: str | None = None
    """Optional ground-truth field (e.g. flag): the summary reports AUROC and rows removed."""
    unsafe_value: str = "unsafe"
    """Value of label_field that marks a harmful row."""

    def __post_init__(self) -> None:
        super().__post_init__()
        cfg.require(bool(self.selection), "selection", "required (a `sealft select` run dir)")
        cfg.require(bool(self.data), "data", "required (a file or dataset id)")
        cfg.require(bool(self.output_dir), "output_dir", "required")
        cfg.require(self.keep_ratio is None or 0 < self.keep_ratio <= 1, "keep_ratio",
                    f"must be in (0, 1], got {self.keep_ratio}")
        cfg.require(self.micro_batch_size > 0, "micro_batch_size", "must be positive")
        cfg.require_positive(self, "limit", "sample")


def fitted_select_args(selection: str | Path):
    """The SelectArgs of a finished run, checked to have a scorer."""
    run = Path(selection)
    if not (run / SCORER_DIR / SCORING_FILE).is_file():
        raise ConfigError(
            f"--selection {run}: no {SCORER_DIR}/{SCORING_FILE}; score new rows with a "
            "`sealft select --method seal --scoring final-pass` run dir")
    try:
        saved = cfg.load_yaml(run / "config.yaml")
        scoring = json.loads((run / SCORER_DIR / SCORING_FILE).read_text(encoding="utf-8"))
    except (ConfigError, OSError, ValueError) as err:
        reason = " ".join(str(err).split())[:200]
        raise ConfigError(f"--selection {run}: cannot read the run's config.yaml or "
                          f"{SCORER_DIR}/{SCORING_FILE} ({reason}); pass a finished "
                          "`sealft select` run dir") from err
    return cfg.build(SelectArgs, saved), scoring


def run_score(args: ScoreArgs) -> dict:
    """Score `args.data` with the scorer of `args.selection`; returns the summary. Under
    `torchrun` / `accelerate launch` each process scores a shard of the rows; the main one
    writes the outputs."""
    from sealft.data import load_examples, sample_rows
    from sealft.runtime import make_accelerator, process_state
    from sealft.seal import load_scorer, score_examples

    started = time.perf_counter()
    fitted, scoring = fitted_select_args(args.selection)
    out = Path(args.output_dir)
    is_main = process_state().is_main_process
    if is_main:
        cfg.start_run(args, "score")  # the manifest: --overwrite deletes only its outputs
    process_state().wait_for_everyone()
    examples = load_examples(args.data, args.split, args.format, args.limit,
                             args.drop_duplicates)
    examples = sample_rows(examples, args.sample, args.seed)
    cfg.check_resume_data(out, {"data": examples}, args.resume)
    accelerator = make_accelerator(out, log=False)
    scorer = load_scorer(Path(args.selection), fitted, scoring, args.dtype,
                         accelerator.device)
    scores, skipped = score_examples(scorer, examples, args.micro_batch_size,
                                     args.show_progress, accelerator)
    if np.isnan(scores).all():
        raise ConfigError(f"--data {args.data}: none of the {len(examples)} rows can be "
                          f"scored ({'; '.join(sorted(set(skipped.values()))[:3])})")
    summary = {}
    if is_main:
        summary = _write_scored(out, args, fitted, scoring, examples, scores, skipped,
                                started, accelerator.num_processes)
    process_state().wait_for_everyone()
    return summary


def _write_scored(out: Path, args: ScoreArgs, fitted: SelectArgs, scoring: dict, examples,
                  scores: np.ndarray, skipped: dict[str, str], started: float,
                  processes: int) -> dict:
    """The outputs of `select`'s contract from the new rows' harm scores."""
    from sealft.io import write_json

    logits = -(scores - scoring["mean"]) / scoring["spread"]
    usable = ~np.isnan(scores)
    if args.keep_ratio is None:
        keep_count = int((scores[usable] <= scoring["threshold"]).sum())
    else:
        keep_count = int(np.ceil(args.keep_ratio * usable.sum() - 1e-9))
    fitted.keep_ratio, fitted.keep_count = None, keep_count
    fitted.label_field, fitted.unsafe_value = args.label_field, args.unsafe_value
    weights = np.exp(logits)  # the fit's normalisation does not carry over; the order does
    extra = {"selection": str(args.selection), "scored_seconds": round(
        time.perf_counter() - started, 2), "threshold": scoring["threshold"],
        "processes": processes}
    summary = write_outputs(out, fitted, examples, logits, weights, skipped, extra,
                            harm_scores=scores)
    summary["wall_seconds"] = round(time.perf_counter() - started, 2)
    write_json(out / "summary.json", summary)
    return summary

