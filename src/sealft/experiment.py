"""`sealft experiment`: the paper's comparison grid — selectors × keep ratios × seeds, each cell
selected, fine-tuned and evaluated, then tabulated and plotted.

Layout of OUTPUT_DIR:
  config.yaml                 the resolved arguments (a rerun must agree on everything but the
                              grid itself: methods, keep_ratios, seeds may grow)
  heldout_harmful.jsonl       with heldout_harmful > 0: the fine-tuning file's flagged questions
                              that no seed's sample contains (every cell is evaluated on them)
  heldout_task.jsonl          with heldout_task > 0: unflagged rows outside every sample, whose
                              answers' loss every cell reports (suite task-loss)
  inputs.json                 what the results depend on besides config.yaml: the SHA-256 of
                              each data file and a fingerprint of the held-out rows
  cells/<method>-keep<r>-seed<s>/
      select/ finetune/ eval/  the three stage dirs (each with its own summary.json)
      done.json               the cell's result row; its presence marks the cell finished
      error.json              the last failure (message + traceback), if any
  results.csv                 one row per cell (failed cells too, with their error)
  results_summary.csv         one row per method and keep ratio: every numeric column's mean
                              over seeds and the half-width of its 95% confidence interval
  results.md                  the same, as a table: mean ± 95% CI half-width (rendered by
                              `report`, as `sealft report OUTPUT_DIR` shows it)
  ratio_sweep.png             refusal and task accuracy against keep ratio (two ratios or more)
  tradeoff.png                refusal against task accuracy per method, with 95% CI error bars

Every cell's options, data paths and evaluation suites are checked before any compute: one bad
cell stops the command (exit 2) before anything runs. A cell that fails while running is
recorded and the grid moves on; the command then exits 1, listing the failed cells.

Reruns skip finished cells and continue unfinished ones stage by stage (a finished selection is
not redone, SEAL resumes from its checkpoint, evaluation reuses its generation cache). A failing
cell is recorded and the grid moves on; the next rerun retries it.

A grid can be split across machines: run the same config (all seeds listed, so that every part
holds out the same rows) in several dirs, with the seeds in another order to start elsewhere,
and stop each part when you like; then `merge_dirs` names the parts in one more run of the
config. Their finished cells count as finished (they are not rerun) wherever their settings
and inputs.json agree with this run's; the rest of the grid runs, and the tables cover it all.
A part needs only config.yaml, inputs.json and results.csv, small enough to keep with the code.

All-data methods (`all`, `safeinstr`) and the `oracle` (every unflagged row) do not depend on
the keep ratio: they run once per seed at keep ratio 1 and show as horizontal lines in the plot.
`base` evaluates the model without fine-tuning, once (greedy answers to the same prompts do not
depend on the seed).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import math
import re
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sealft import config as cfg
from sealft.baselines import SAFEINSTR_FILE, SAFEINSTR_INFO_FILE, write_safeinstr
from sealft.data import load_examples, sample_rows
from sealft.errors import ConfigError, SealftError
from sealft.evaluate import EvaluateArgs, evaluate
from sealft.evaluate.likelihood import SUITE as TASK_LOSS
from sealft.evaluate.run import suite_context, task_rows
from sealft.evaluate.suites import build_suites, expand_suite_names
from sealft.finetune import FinetuneArgs, run_finetune
from sealft.io import (
    file_sha256,
    prepare_output_dir,
    read_jsonl,
    write_json,
    write_jsonl,
    write_yaml,
)
from sealft.select import METHODS as SELECT_METHODS
from sealft.select import SelectArgs, run_select

# SEAL variants: `seal` runs the configured algorithm (select.algorithm, the product default
# unless set); the others pin one.
SEAL_ALGORITHMS = {"seal": None, "seal-penalty": "penalty",
                   "seal-memory-efficient": "memory-efficient", "seal-safety-step": "safety-step"}
SELECTORS = ("all", "random", "dsir", "reference-loss", "oracle", *SEAL_ALGORITHMS)
METHODS = ("all", "random", "dsir", "reference-loss", "seal", "safeinstr", "seal+safeinstr")
SAFEINSTR = "safeinstr"
BASE = "base"  # the model without fine-tuning: evaluation only
RATIO_FREE = ("all", "oracle", BASE)
# Table, plot and legend order.
METHOD_ORDER = (BASE, "all", "random", "dsir", "reference-loss", "oracle", "seal", "safeinstr",
                "seal+safeinstr", "seal-penalty")
HELDOUT_SET = "heldout_harmful"
HELDOUT_TASK = "heldout_task"
SELECTOR_NAMES = SELECT_METHODS  # keys of method_select: what `sealft select --method` takes
# Grid fields: a rerun may change them (to extend the grid); everything else must match.
GRID_FIELDS = ("methods", "keep_ratios", "seeds", "overwrite", "plot", "merge_dirs")
INPUTS_FILE = "inputs.json"
COUNT_COLUMNS = ("seed", "rows", "kept", "harmful_trained", "safety_added")  # ints in CSV
MERGE_FILES = ("config.yaml", INPUTS_FILE, "results.csv")
METRIC_COLUMNS = ("safety_refusal_rate", "over_refusal_rate", "task_accuracy", "win_rate")
RESULT_COLUMNS = (
    "method", "keep_ratio", "seed", "status", *METRIC_COLUMNS, "safety_harmfulness_rate",
    "heldout_refusal_rate", "task_loss", "task_token_accuracy", "select_seconds",
    "finetune_seconds", "evaluate_seconds", "peak_memory_mb", "rows", "kept", "harmful_trained",
    "safety_added", "unsafe_removed_share", "auroc_unsafe_low_weight", "win_rate_reference",
    "error", "cell_dir",
)
# Identity and bookkeeping columns: everything else numeric is averaged over seeds.
NOT_AGGREGATED = ("method", "keep_ratio", "seed", "status", "win_rate_reference", "error",
                  "cell_dir")


@dataclass
class ExperimentArgs:
    output_dir: str = ""
    """Experiment directory (cells/, results.csv, results.md, ratio_sweep.png); rerunning
    into it skips finished cells."""
    model: str | None = None
    """Model for every stage (a stage section's own `model` wins)."""
    finetune_data: str | None = None
    """Fine-tuning data to select from (or set select.finetune_data)."""
    safe_data: str | None = None
    """Safe set: SEAL's upper level, DSIR's target, reference-loss's data (and SafeInstr's,
    unless safeinstr_data is set)."""
    safeinstr_data: str | None = None
    """SafeInstr's safety examples (prompts with refusals); default: the safe set."""
    methods: tuple[str, ...] = METHODS
    """Comma-separated: base (no fine-tuning), all, random, dsir, reference-loss, oracle
    (removes exactly the rows select.label_field flags), seal (select.algorithm), seal-penalty,
    seal-memory-efficient, seal-safety-step, safeinstr (= all + safety mix),
    SELECTOR+safeinstr."""
    keep_ratios: tuple[float, ...] = (0.8,)
    """Keep ratios to sweep (all-data methods run once, at 1)."""
    seeds: tuple[int, ...] = (0,)
    """Seeds: each cell's selection and fine-tuning seed (and its data sample, with
    select.sample); results are mean ± 95% confidence interval over them."""
    select: dict[str, Any] = field(default_factory=dict)
    """Options of `sealft select` shared by all cells (method, keep ratio, seed and
    output_dir are set per cell)."""
    method_select: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-selector overrides of `select`, keyed by selector (seal, dsir, random,
    reference-loss, all): e.g. SEAL's own batch size. A `model` here is a proxy that only
    scores the data (the paper's proxy -> target transfer): every cell fine-tunes and
    evaluates the top-level model."""
    finetune: dict[str, Any] = field(default_factory=dict)
    """Options of `sealft finetune` (data and output_dir are set per cell)."""
    evaluate: dict[str, Any] = field(default_factory=dict)
    """Options of `sealft evaluate` (model, adapter, output_dir set per cell; the evaluation
    seed stays fixed so every cell answers the same prompts)."""
    safeinstr_k: int = 100
    """SafeInstr: safety examples appended to the selection."""
    heldout_harmful: int = 0
    """Also evaluate every cell on this many harmful questions of the fine-tuning file's own
    kind that no cell trains on: its rows flagged by select.label_field outside every seed's
    sample (needs select.sample; 0: off)."""
    heldout_task: int = 0
    """Also report every cell's loss on the answers of this many rows of the fine-tuning file
    that no seed's sample contains and select.label_field does not flag: the task's own
    held-out data, for long-form files with no accuracy to measure (suite task-loss; needs
    select.sample; 0: off)."""
    weighted: bool = False
    """Weight the fine-tuning loss by the learned weights (not with +safeinstr methods)."""
    plot: bool = True
    """Draw ratio_sweep.png and tradeoff.png."""
    overwrite: bool = False
    """Delete the output dir's previous contents instead of resuming."""
    merge_dirs: tuple[str, ...] = ()
    """Dirs of this same grid run elsewhere (its seeds in another order on another machine,
    say), each with config.yaml, inputs.json and results.csv: their finished cells are taken as
    finished here, not rerun. Their settings other than the grid, and their data digests, must
    match; so must their seeds as a set, since the held-out rows lie outside every seed's
    sample."""

    def __post_init__(self) -> None:
        cfg.require(bool(self.output_dir), "output_dir", "required")
        for folder in self.merge_dirs:
            cfg.require(Path(folder).is_dir(), "merge_dirs", f"{folder} is not a directory")
            missing = [n for n in MERGE_FILES if not (Path(folder) / n).is_file()]
            cfg.require(not missing, "merge_dirs", f"{folder} lacks {', '.join(missing)}: give "
                        "a dir that `sealft experiment` wrote")
        for name in ("select", "finetune", "evaluate", "method_select"):
            cfg.require(isinstance(getattr(self, name), dict), name,
                        "must be a mapping of options")
        for selector, options in self.method_select.items():
            cfg.require(selector in SELECTOR_NAMES and isinstance(options, dict),
                        f"method_select.{selector}",
                        f"keys are selectors ({', '.join(SELECTOR_NAMES)}), values mappings")
        cfg.require(bool(self.methods), "methods", "name at least one method")
        for method in self.methods:
            parse_method(method)
        cfg.require(len(set(self.methods)) == len(self.methods), "methods", "repeated method")
        cfg.require(bool(self.keep_ratios) and all(0 < r <= 1 for r in self.keep_ratios),
                    "keep_ratios", f"each must be in (0, 1], got {self.keep_ratios}")
        cfg.require(bool(self.seeds), "seeds", "name at least one seed")
        cfg.require(self.safeinstr_k >= 0, "safeinstr_k", "must be >= 0")
        cfg.require(self.heldout_harmful >= 0, "heldout_harmful", "must be >= 0")
        cfg.require(self.heldout_task >= 0, "heldout_task", "must be >= 0")
        cfg.require(not self.heldout_task or bool(self.select.get("sample")), "heldout_task",
                    "needs select.sample (rows outside every sample are held out)")
        if self.heldout_harmful:
            cfg.require(bool(self.select.get("label_field") and self.select.get("sample")),
                        "heldout_harmful", "needs select.label_field (which rows are harmful) "
                        "and select.sample (rows outside every sample are held out)")
        mixes = [m for m in self.methods if parse_method(m).safeinstr]
        cfg.require(not (self.weighted and mixes), "weighted",
                    f"the safety rows of {', '.join(mixes)} have no learned weight")
        cfg.require(not mixes or bool(self.safeinstr_data or self.safe_data
                                      or self.select.get("safe_data")),
                    "safeinstr_data", f"required by {', '.join(mixes)} (or set safe_data)")


@dataclass(frozen=True)
class MethodSpec:
    """How a method name maps onto the stages."""

    name: str
    selector: str
    """SelectArgs.method."""
    algorithm: str | None
    """SEAL algorithm to pin (None: not SEAL, or SEAL with select.algorithm)."""
    safeinstr: bool
    """Append the SafeInstr safety mix to the selection."""

    @property
    def ratio_free(self) -> bool:
        return self.selector in RATIO_FREE

    @property
    def trains(self) -> bool:
        return self.selector != BASE


def parse_method(name: str) -> MethodSpec:
    if name == BASE:
        return MethodSpec(BASE, BASE, None, False)
    base, plus, mix = name.partition("+")
    if name == SAFEINSTR:
        base, plus, mix = "all", "+", SAFEINSTR
    if base not in SELECTORS or (plus and mix != SAFEINSTR):
        raise ConfigError(f"--methods: unknown method {name!r}; use {BASE}, "
                          f"{', '.join(METHODS)}, oracle or SELECTOR+safeinstr")
    selector = "seal" if base in SEAL_ALGORITHMS else base
    return MethodSpec(name, selector, SEAL_ALGORITHMS.get(base), bool(plus))


@dataclass(frozen=True)
class Cell:
    method: MethodSpec
    keep_ratio: float
    seed: int
    folder: Path

    @property
    def name(self) -> str:
        return self.folder.name


@dataclass
class CellStages:
    select: SelectArgs | None
    """None for the base model (nothing is selected or trained)."""
    finetune: FinetuneArgs | None
    evaluate: EvaluateArgs


# ---------------------------------------------------------------------------------------------
# Grid and stage arguments
# ---------------------------------------------------------------------------------------------


def cell_name(method: str, keep_ratio: float, seed: int) -> str:
    return f"{method}-keep{keep_ratio:g}-seed{seed}"


def grid(args: ExperimentArgs) -> list[Cell]:
    """Cells in run order: per seed, the all-data SFT cell first (the win-rate reference); the
    base model once, with the first seed."""
    cells = []
    for seed in args.seeds:
        specs = sorted((parse_method(m) for m in args.methods), key=lambda s: s.name != "all")
        for spec in specs:
            if not spec.trains and seed != args.seeds[0]:
                continue
            for ratio in ((1.0,) if spec.ratio_free else sorted(set(args.keep_ratios))):
                folder = Path(args.output_dir) / "cells" / cell_name(spec.name, ratio, seed)
                cells.append(Cell(spec, ratio, seed, folder))
    return cells


def _shared_select_options(args: ExperimentArgs) -> dict[str, Any]:
    shared = {"model": args.model, "finetune_data": args.finetune_data,
              "safe_data": args.safe_data}
    return {k: v for k, v in shared.items() if v is not None}


def target_model(args: ExperimentArgs) -> str:
    """The model every cell fine-tunes (a method_select model is only a selection proxy)."""
    return args.model or args.select.get("model") or SelectArgs.model


def stage_args(args: ExperimentArgs, cell: Cell, reference_eval: Path | None) -> CellStages:
    """The three stages' arguments for one cell (built up front so bad options fail at once)."""
    if not cell.method.trains:
        return CellStages(None, None, base_eval_args(args, cell))
    overrides: dict[str, Any] = {
        "method": cell.method.selector, "keep_ratio": cell.keep_ratio, "keep_count": None,
        "seed": cell.seed, "output_dir": str(cell.folder / "select"), "resume": True,
        "overwrite": False,
    }
    if cell.method.algorithm:
        overrides["algorithm"] = cell.method.algorithm
    select = cfg.build(SelectArgs, _shared_select_options(args), args.select,
                       args.method_select.get(cell.method.selector, {}), overrides)
    data = SAFEINSTR_FILE if cell.method.safeinstr else "selected.jsonl"
    defaults: dict[str, Any] = {
        "data": str(cell.folder / "select" / data), "max_length": select.max_length,
        "lora_r": select.lora_r, "lora_alpha": select.lora_alpha,
        "lora_target_modules": select.lora_target_modules, "dtype": select.dtype,
        "chat_template": select.chat_template, "trust_remote_code": select.trust_remote_code,
    }
    if args.weighted:
        defaults["weights_from"] = str(cell.folder / "select" / "scores.jsonl")
    finetune = cfg.build(FinetuneArgs, {"model": target_model(args)}, defaults, args.finetune, {
        "seed": cell.seed, "output_dir": str(cell.folder / "finetune"),
        "resume": (cell.folder / "finetune").exists(), "overwrite": False})
    eval_defaults: dict[str, Any] = {
        "model": finetune.model, "label": cell.name, "suite": "safety,overrefusal,task",
        "chat_template": finetune.chat_template, "trust_remote_code": finetune.trust_remote_code,
    }
    if reference_eval is not None and wants_helpfulness(args):
        eval_defaults["helpfulness_reference"] = str(reference_eval)
    evaluation = cfg.build(EvaluateArgs, eval_defaults, args.evaluate, heldout_options(args), {
        "adapter": str(cell.folder / "finetune" / "adapter"),
        "output_dir": str(cell.folder / "eval"), "overwrite": False})
    return CellStages(select, finetune, evaluation)


def base_eval_args(args: ExperimentArgs, cell: Cell) -> EvaluateArgs:
    """The untouched model on the same prompts as every fine-tuned cell."""
    defaults = {"model": target_model(args), "label": cell.name,
                "suite": "safety,overrefusal,task"}
    return cfg.build(EvaluateArgs, defaults, args.evaluate, heldout_options(args), {
        "adapter": None, "helpfulness_reference": None,
        "output_dir": str(cell.folder / "eval"), "overwrite": False})


def heldout_path(args: ExperimentArgs, name: str = HELDOUT_SET) -> Path:
    return Path(args.output_dir) / f"{name}.jsonl"


def _listed(value: Any) -> list[str]:
    """A list option as YAML (a list) or a key=value override (comma-separated) gives it."""
    if value is None:
        return []
    return [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)


def heldout_options(args: ExperimentArgs) -> dict[str, Any]:
    """The held-out harmful questions as one more prompt set of every cell's evaluation, and
    the held-out task rows as suite task-loss."""
    suites = _listed(args.evaluate.get("suite", "safety,overrefusal,task"))
    samples = _listed(args.evaluate.get("suite_samples", args.evaluate.get("suite_limits")))
    options: dict[str, Any] = {}
    if args.heldout_harmful:
        suites.append("custom")
        samples.append(f"custom={args.heldout_harmful}")
        options |= {"prompt_files": [*_listed(args.evaluate.get("prompt_files")),
                                     f"{HELDOUT_SET}={heldout_path(args)}#prompt"],
                    "prompt_files_kind": "harmful"}
    if args.heldout_task:  # every row of the file, whatever evaluate.sample says
        suites.append(TASK_LOSS)
        samples.append(f"{TASK_LOSS}={args.heldout_task}")
        options["task_data"] = str(heldout_path(args, HELDOUT_TASK))
    if not options:
        return {}
    return options | {"suite": ",".join(dict.fromkeys(suites)), "suite_samples": samples}


def alpaca_question(text: str) -> str:
    """The question inside an Alpaca-style prompt wrapper (the text itself if unwrapped)."""
    wrapped = re.search(r"### Instruction:\n(.*?)\n\n### Response:", text, re.S)
    return (wrapped.group(1) if wrapped else text).strip()


def outside_samples(args: ExperimentArgs) -> tuple[SelectArgs, list[dict[str, Any]], list]:
    """Rows of the fine-tuning file that no seed's sample contains, split into the flagged
    ones (select.label_field = select.unsafe_value) and the others."""
    select = cfg.build(SelectArgs, _shared_select_options(args), args.select,
                       {"output_dir": str(Path(args.output_dir) / "unused")})
    examples = load_examples(select.finetune_data, select.split, select.format, select.limit,
                             select.drop_duplicates)
    seen: set[str] = set()
    for seed in args.seeds:
        seen |= {e["id"] for e in sample_rows(examples, select.sample, seed)}
    flagged, other = [], []
    for e in examples:
        if e["id"] not in seen:
            unsafe = bool(select.label_field) and (str(e["meta"].get(select.label_field))
                                                   == select.unsafe_value)
            (flagged if unsafe else other).append(e)
    return select, flagged, other


HeldoutSplit = tuple[SelectArgs, list[dict[str, Any]], list]


def heldout_rows(args: ExperimentArgs, split: HeldoutSplit) -> list[dict[str, str]]:
    """Flagged rows of the fine-tuning file that no seed's sample contains (`split`, from
    outside_samples), as prompts: how fine-tuning on that kind of data changed the model, on
    questions it never trained on."""
    select, flagged, _ = split
    if not flagged:
        raise ConfigError(f"no row of {select.finetune_data} flagged "
                          f"{select.label_field}={select.unsafe_value} lies outside the samples")
    return [{"id": e["id"], "prompt": alpaca_question(e["messages"][-2]["content"])}
            for e in flagged]


def heldout_task_rows(args: ExperimentArgs, split: HeldoutSplit) -> list[dict[str, Any]]:
    """A seeded sample (in file order) of the unflagged rows outside every seed's sample
    (`split`, from outside_samples): the fine-tuning task's held-out answers."""
    select, _, other = split
    if len(other) < args.heldout_task:
        raise ConfigError(f"heldout_task={args.heldout_task}: only {len(other)} unflagged rows "
                          f"of {select.finetune_data} lie outside the samples; lower it")
    return [{"id": e["id"], "messages": e["messages"]}
            for e in sample_rows(other, args.heldout_task, 0)]


def write_heldout(args: ExperimentArgs, rows: list[dict[str, Any]],
                  name: str = HELDOUT_SET) -> None:
    """Write held-out rows once; a rerun whose seeds would change them is refused (the
    finished cells were evaluated on the old ones)."""
    path = heldout_path(args, name)
    if path.exists() and read_jsonl(path) != rows:
        raise ConfigError(f"{path}: these seeds hold out other rows than the finished "
                          "cells were evaluated on; use another output_dir")
    write_jsonl(path, rows)


def wants_helpfulness(args: ExperimentArgs) -> bool:
    suites = str(args.evaluate.get("suite", "")).replace(" ", "").split(",")
    return "helpfulness" in suites or "all" in suites


def reference_eval_dir(args: ExperimentArgs, cell: Cell) -> Path | None:
    """All-data SFT's evaluation of the same seed: the paper's win-rate reference."""
    if cell.method.name == "all" or "all" not in args.methods:
        return None
    return Path(args.output_dir) / "cells" / cell_name("all", 1.0, cell.seed) / "eval"


# ---------------------------------------------------------------------------------------------
# One cell
# ---------------------------------------------------------------------------------------------


def _reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def run_cell(args: ExperimentArgs, cell: Cell, stages: CellStages) -> dict[str, Any]:
    """Select (+ mix), fine-tune, evaluate; each stage is skipped if its summary exists."""
    folder = cell.folder
    if not cell.method.trains:
        evaluate(stages.evaluate)
        return result_row(cell, {}, {}, _read_json(folder / "eval" / "summary.json"), {}, None)
    _reset_peak_memory()
    select_summary = (_read_json(folder / "select" / "summary.json")
                      or reuse_twin_selection(cell, stages.select) or run_select(stages.select))
    mix = {}
    if cell.method.safeinstr:
        mix = safeinstr_for(args, stages.select, folder / "select", cell.seed)
    _reset_peak_memory()
    finetune_summary = _read_json(folder / "finetune" / "summary.json")
    if not finetune_summary or not (folder / "finetune" / "adapter").exists():
        finetune_summary = run_finetune(stages.finetune)
    evaluate(stages.evaluate)
    eval_summary = _read_json(folder / "eval" / "summary.json")
    return result_row(cell, select_summary, finetune_summary, eval_summary, mix,
                      stages.evaluate.helpfulness_reference)


def twin_method(method: MethodSpec) -> str | None:
    """The method whose selection is this one's: SELECTOR+safeinstr and SELECTOR select alike
    (the mix only appends rows), and `safeinstr` is `all` plus the mix."""
    if method.safeinstr:
        return method.name.partition("+")[0] if "+" in method.name else "all"
    if not method.trains:
        return None
    return SAFEINSTR if method.name == "all" else f"{method.name}+{SAFEINSTR}"


def reuse_twin_selection(cell: Cell, select: SelectArgs) -> dict[str, Any] | None:
    """A SELECTOR+safeinstr cell selects exactly what its SELECTOR cell selects when their
    options agree: copy whichever of the two finished first (SEAL's is the expensive stage;
    a split grid may run the methods in either order) instead of recomputing it. Returns the
    copied summary, or None when there is no such twin."""
    base = twin_method(cell.method)
    if base is None:
        return None
    twin = cell.folder.parent / cell_name(base, cell.keep_ratio, cell.seed) / "select"
    if not (twin / "summary.json").exists() or not (twin / "config.yaml").exists():
        return None
    same = {k: v for k, v in cfg.to_dict(select).items() if k != "output_dir"}
    theirs = {k: v for k, v in cfg.load_yaml(twin / "config.yaml").items() if k != "output_dir"}
    if same != theirs:
        return None
    target = Path(select.output_dir)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # the twin's SafeInstr mix is its own: this cell writes its mix, or has none
    shutil.copytree(twin, tmp, ignore=shutil.ignore_patterns(
        "checkpoint*", "logs", SAFEINSTR_FILE, SAFEINSTR_INFO_FILE))
    summary = _read_json(tmp / "summary.json")
    summary["reused_from"] = str(twin)
    write_json(tmp / "summary.json", summary)
    write_yaml(tmp / "config.yaml", cfg.to_dict(select))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    print(f"[experiment] {cell.name}: selection reused from {twin.parent.name}", file=sys.stderr)
    return summary


def safeinstr_for(args: ExperimentArgs, select: SelectArgs, folder: Path, seed: int) -> dict:
    if args.safeinstr_data:
        return write_safeinstr(folder, args.safeinstr_data, args.safeinstr_k, seed)
    return write_safeinstr(folder, select.safe_data, args.safeinstr_k, seed, select.safe_format,
                           select.split)


def result_row(cell: Cell, select: dict, finetune: dict, evaluation: dict, mix: dict,
               win_reference: str | None) -> dict[str, Any]:
    labels = select.get("labels") or {}
    peaks = [s.get("peak_memory_mb") for s in (select, finetune)]
    by_set = evaluation.get("refusal_by_set") or {}
    return {
        "method": cell.method.name, "keep_ratio": cell.keep_ratio, "seed": cell.seed,
        "status": "ok", **{k: evaluation.get(k) for k in METRIC_COLUMNS},
        "safety_harmfulness_rate": evaluation.get("safety_harmfulness_rate"),
        "heldout_refusal_rate": by_set.get(HELDOUT_SET),
        "task_loss": evaluation.get("task_loss"),
        "task_token_accuracy": evaluation.get("task_token_accuracy"),
        "select_seconds": select.get("wall_seconds"),
        "finetune_seconds": finetune.get("wall_seconds"),
        "evaluate_seconds": evaluation.get("wall_seconds"),
        "peak_memory_mb": max((p for p in peaks if p is not None), default=None),
        "rows": select.get("rows"), "kept": select.get("kept"),
        "harmful_trained": harmful_trained(cell, select),
        "safety_added": mix.get("safety_added"),
        "unsafe_removed_share": labels.get("unsafe_removed_share"),
        "auroc_unsafe_low_weight": labels.get("auroc_unsafe_low_weight"),
        "win_rate_reference": win_reference or ("default" if evaluation.get("win_rate")
                                                is not None else None),
        "error": None, "cell_dir": str(cell.folder),
        # per prompt set (advbench, harmbench, xstest, custom files): refusal rate
        **{f"refusal_{name}": rate for name, rate in sorted(by_set.items())},
    }


def harmful_trained(cell: Cell, select: dict) -> int | None:
    """Flagged rows the cell fine-tuned on (the SafeInstr rows are refusals, never flagged);
    None without ground truth."""
    if not cell.method.trains:
        return 0
    unsafe = (select.get("labels") or {}).get("unsafe_rows")
    removed = (select.get("labels") or {}).get("unsafe_removed")
    return None if unsafe is None or removed is None else unsafe - removed


def failed_row(cell: Cell, err: BaseException) -> dict[str, Any]:
    row = dict.fromkeys(RESULT_COLUMNS)
    row.update(method=cell.method.name, keep_ratio=cell.keep_ratio, seed=cell.seed,
               status="failed", error=f"{type(err).__name__}: {err}", cell_dir=str(cell.folder))
    return row


CellRunner = Callable[[ExperimentArgs, Cell, CellStages], dict[str, Any]]


def done_path(cell: Cell) -> Path:
    return cell.folder / "done.json"


def run_or_record(args: ExperimentArgs, cell: Cell, runner: CellRunner = run_cell) -> dict:
    """The cell's result; a failure becomes a row with its error instead of stopping the grid."""
    done = done_path(cell)
    if done.exists():
        print(f"[experiment] {cell.name}: finished earlier, skipped", file=sys.stderr)
        return _read_json(done)
    cell.folder.mkdir(parents=True, exist_ok=True)
    print(f"[experiment] {cell.name}: running", file=sys.stderr)
    started = time.perf_counter()
    try:
        stages = stage_args(args, cell, reference_eval_dir(args, cell))
        row = runner(args, cell, stages)
    except Exception as err:  # one broken cell must not cost the rest of the grid
        row = failed_row(cell, err)
        write_json(cell.folder / "error.json",
                   {"error": row["error"], "traceback": traceback.format_exc()})
        print(f"[experiment] {cell.name}: FAILED: {row['error']}", file=sys.stderr)
    else:
        row["cell_seconds"] = round(time.perf_counter() - started, 2)
        write_json(done, row)
        (cell.folder / "error.json").unlink(missing_ok=True)
    finally:
        _free_memory()
    return row


def _free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Whole grid
# ---------------------------------------------------------------------------------------------


def prepare_experiment_dir(args: ExperimentArgs) -> Path:
    """Create the dir, or resume one whose settings (other than the grid) are unchanged."""
    out = Path(args.output_dir)
    previous = out / "config.yaml"
    if not args.overwrite and not previous.exists() and out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--output-dir {out} is not empty and not an experiment dir; use "
                          "another dir or --overwrite")
    if previous.exists() and not args.overwrite:
        changed = changed_settings(cfg.load_yaml(previous), args)
        if changed:
            raise ConfigError(
                f"--output-dir {out} holds an experiment with different {', '.join(changed)}; "
                "use another dir or --overwrite (methods, keep_ratios and seeds may change)")
    out = prepare_output_dir(out, args.overwrite, resume=not args.overwrite, stage="experiment",
                             inputs=cfg.input_paths(args))
    write_yaml(out / "config.yaml", cfg.to_dict(args))
    return out


# Data files and hub dataset ids, as `sealft.data.read_rows` tells them apart.
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".gz")


def check_data_source(source: str, flag: str) -> None:
    """A local path must exist; anything else must look like a hub dataset id."""
    if Path(source).expanduser().exists():
        return
    if _HUB_ID.fullmatch(source) and not source.endswith(_DATA_SUFFIXES):
        return
    raise ConfigError(f"{flag}: {source} does not exist (relative to {Path.cwd()})")


def check_model_source(model: str, flag: str) -> None:
    """A model written as a path (./, ../, /, ~ or a .gguf file) must exist; hub ids are
    resolved when the stage loads them."""
    looks_local = model.startswith(("/", "./", "../", "~")) or model.endswith(".gguf")
    if looks_local and not Path(model).expanduser().exists():
        raise ConfigError(f"{flag}: {model} does not exist (relative to {Path.cwd()})")


def check_cell(args: ExperimentArgs, cell: Cell) -> None:
    """Everything about one cell that can fail without loading a model."""
    stages = stage_args(args, cell, reference_eval_dir(args, cell))
    check_model_source(stages.evaluate.model, "model")
    if stages.select is None:
        return
    check_model_source(stages.select.model, "select.model")
    check_data_source(stages.select.finetune_data, "finetune_data")
    if stages.select.safe_data:
        check_data_source(stages.select.safe_data, "safe_data")
    if cell.method.safeinstr and args.safeinstr_data:
        check_data_source(args.safeinstr_data, "safeinstr_data")
    if cell.method.selector == "oracle":
        cfg.require(bool(stages.select.label_field), "select.label_field",
                    "the oracle needs the ground-truth field (e.g. flag)")


def check_suites(args: ExperimentArgs) -> None:
    """Suite names and their prompt files, read once as `evaluate` would (no model loaded)."""
    probe = cfg.build(EvaluateArgs, {"model": target_model(args),
                                     "suite": "safety,overrefusal,task"},
                      args.evaluate, {"output_dir": str(Path(args.output_dir) / "eval")})
    ctx = suite_context(probe)
    names = expand_suite_names(probe.suite, ctx)
    build_suites(names, ctx)
    if TASK_LOSS in names and not (probe.task_data or args.heldout_task):
        raise ConfigError("suite task-loss needs evaluate.task_data or heldout_task")
    if probe.task_data:
        task_rows(probe, names, ctx)


def check_scipy() -> None:
    """The confidence intervals over seeds use scipy's Student t (found before any compute,
    not after the first cell)."""
    import importlib.util

    if importlib.util.find_spec("scipy") is None:
        raise ConfigError("intervals over several seeds need scipy: pip install scipy")


def validate_grid(args: ExperimentArgs, cells: list[Cell]) -> dict[str, list[dict[str, Any]]]:
    """Check every cell before any compute; raise one error naming every bad cell. Returns
    the held-out rows to write, by file name (heldout_harmful, heldout_task)."""
    problems: dict[str, list[str]] = {}  # message -> cells: a shared mistake is listed once
    checks: list[tuple[str, Callable[[], Any]]] = [("evaluate", lambda: check_suites(args))]
    checks += [(c.name, lambda c=c: check_cell(args, c)) for c in cells]
    if len(args.seeds) > 1:
        checks.append(("seeds", check_scipy))
    heldout: dict[str, list[dict[str, Any]]] = {}
    split = functools.cache(lambda: outside_samples(args))  # the file is read once for both
    for name, wanted, read in ((HELDOUT_SET, args.heldout_harmful, heldout_rows),
                               (HELDOUT_TASK, args.heldout_task, heldout_task_rows)):
        if wanted:
            checks.append((name, lambda name=name, read=read:
                           heldout.__setitem__(name, read(args, split()))))
    for name, check in checks:
        try:
            check()
        except SealftError as err:
            problems.setdefault(" ".join(str(err).split()), []).append(name)
    if problems:
        listed = "; ".join(f"{', '.join(names)}: {message}"
                           for message, names in problems.items())
        raise ConfigError(f"nothing was run, {sum(map(len, problems.values()))} check(s) "
                          f"failed: {listed}")
    return heldout


def changed_settings(old: dict[str, Any], args: ExperimentArgs,
                     ignore: tuple[str, ...] = ()) -> list[str]:
    """Options outside the grid (and `ignore`) that differ between a saved config.yaml and
    `args`; an option added since that config was saved counts as its default there."""
    new, defaults = cfg.to_dict(args), field_defaults(ExperimentArgs)
    return [k for k in new if k not in (*GRID_FIELDS, *ignore)
            and old.get(k, defaults[k]) != new[k]]


def field_defaults(cls: type) -> dict[str, Any]:
    """A dataclass's defaults as config.yaml holds them (tuples as lists)."""
    values = {}
    for spec in dataclasses.fields(cls):
        value = spec.default_factory() if spec.default is dataclasses.MISSING else spec.default
        values[spec.name] = list(value) if isinstance(value, tuple) else value
    return values


def run_grid(args: ExperimentArgs, runner: CellRunner = run_cell) -> list[dict[str, Any]]:
    """Validate, then run (or resume) the grid; returns one result row per cell and writes
    the reports."""
    cells = grid(args)
    heldout = validate_grid(args, cells)
    digests = input_digests(args, heldout)
    if not args.overwrite:
        check_inputs(Path(args.output_dir), digests)
    merged = merged_cells(args, digests, cells)
    out = prepare_experiment_dir(args)
    for name, rows in heldout.items():
        write_heldout(args, rows, name)
    write_json(out / INPUTS_FILE, digests)
    rows = []
    for cell in cells:
        if cell.name in merged and not done_path(cell).exists():
            print(f"[experiment] {cell.name}: finished in {merged[cell.name]['merged_from']}, "
                  "merged", file=sys.stderr)
            rows.append(merged[cell.name])
        else:
            rows.append(run_or_record(args, cell, runner))
        write_reports(out, rows, plot=False)  # partial results survive an interrupted grid
    write_reports(out, rows, plot=args.plot)
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"[experiment] {len(rows) - len(failed)} of {len(rows)} cells finished; results in "
          f"{out / 'results.md'}", file=sys.stderr)
    return rows


def run_experiment(args: ExperimentArgs, runner: CellRunner = run_cell) -> int:
    """`sealft experiment`: exit code 0 when every cell finished, 1 (failed cells listed)
    otherwise; bad options and paths raise before anything runs (exit 2)."""
    failed = [r for r in run_grid(args, runner) if r["status"] != "ok"]
    for row in failed:
        print(f"[experiment] failed: {Path(str(row['cell_dir'])).name}: {row['error']}",
              file=sys.stderr)
    if failed:
        print(f"[experiment] {len(failed)} cell(s) failed; rerun the command to retry them",
              file=sys.stderr)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# Inputs, and grids split across machines
# ---------------------------------------------------------------------------------------------


def input_digests(args: ExperimentArgs, heldout: dict[str, list[dict[str, Any]]]
                  ) -> dict[str, Any]:
    """What every cell's result depends on besides the settings: the bytes of each local data
    file (a path alone does not say the file is the same on another machine; a hub id is
    kept as given) and the held-out rows."""
    select = cfg.build(SelectArgs, _shared_select_options(args), args.select,
                       {"method": "all", "output_dir": str(Path(args.output_dir) / "unused")})
    files = {"finetune_data": select.finetune_data, "safe_data": select.safe_data,
             "safeinstr_data": args.safeinstr_data, "task_data": args.evaluate.get("task_data")}
    digests: dict[str, Any] = {}
    for name, source in files.items():
        if source:
            local = Path(source).expanduser()
            digests[name] = f"sha256:{file_sha256(local)}" if local.is_file() else source
    for name, rows in sorted(heldout.items()):
        digests[name] = cfg.data_fingerprint([{"id": r["id"], "messages": r.get("messages")
                                               or r["prompt"]} for r in rows])
    return digests


def check_inputs(out: Path, digests: dict[str, Any]) -> None:
    """A rerun over changed data is refused: the finished cells were measured on the old. (A
    dir started before inputs.json was written has nothing to compare.)"""
    path = out / INPUTS_FILE
    changed = differing_keys(_read_json(path), digests) if path.exists() else []
    changed = [k for k in changed if k not in (HELDOUT_SET, HELDOUT_TASK)]  # write_heldout's
    if changed:
        raise ConfigError(f"{path}: {', '.join(changed)} changed since the finished cells ran; "
                          "restore it, or use another output_dir")


def differing_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def merged_cells(args: ExperimentArgs, digests: dict[str, Any],
                 cells: list[Cell]) -> dict[str, dict[str, Any]]:
    """The cells of this grid that a dir of merge_dirs finished, by cell name. The base model
    is run once per grid, under whichever seed came first there, so its row stands for this
    grid's base cell whatever its seed."""
    from sealft.report import read_rows_csv

    wanted = {c.name for c in cells}
    base = next((c.name for c in cells if not c.method.trains), None)
    found: dict[str, dict[str, Any]] = {}
    for folder in map(Path, args.merge_dirs):
        changed = changed_settings(cfg.load_yaml(folder / "config.yaml"), args,
                                   ignore=("output_dir",))
        if changed:
            raise ConfigError(f"--merge-dirs: {folder} ran other settings "
                              f"({', '.join(changed)}); merge only parts of this same grid")
        changed = differing_keys(_read_json(folder / INPUTS_FILE), digests)
        if changed and set(changed) <= {HELDOUT_SET, HELDOUT_TASK}:
            raise ConfigError(f"--merge-dirs: {folder} held out other rows ({', '.join(changed)})"
                              ": the held-out rows lie outside every listed seed's sample, so "
                              "each part must list the same seeds (in any order)")
        if changed:
            raise ConfigError(f"--merge-dirs: {folder} ran on other data or held-out rows "
                              f"({', '.join(changed)}); merge only parts of this same grid")
        for row in read_rows_csv(folder / "results.csv"):
            if row.get("status") != "ok":
                continue
            row |= {k: int(row[k]) for k in COUNT_COLUMNS if isinstance(row.get(k), float)}
            name = (base if row["method"] == BASE else
                    cell_name(row["method"], float(row["keep_ratio"]), row["seed"]))
            if name in wanted and name not in found:  # the first dir that finished it
                found[name] = row | {"merged_from": str(folder)}
    return found


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


def write_reports(out: Path, rows: list[dict[str, Any]], plot: bool = True) -> None:
    """results.csv and results_summary.csv, then results.md and the plots through `report`,
    the renderer `sealft report` uses for the same dir (each file written atomically)."""
    from sealft import report

    summary = aggregate(rows)
    report.write_rows_csv(out / "results.csv", rows, RESULT_COLUMNS)
    # mean and interval side by side, in result-column order (the first row has every key)
    report.write_rows_csv(out / "results_summary.csv", summary,
                          tuple(summary[0]) if summary else ())
    report.write_experiment_page(report.ExperimentRun(out, summary, rows), plot=plot)


def _values(rows: list[dict[str, Any]], key: str) -> list[float]:
    out = []
    for row in rows:
        value = row.get(key)
        if value is not None and value != "" and not math.isnan(float(value)):
            out.append(float(value))
    return out


def mean_ci(values: list[float], confidence: float = 0.95) -> tuple[float | None, float | None]:
    """Mean and the half-width of its Student-t confidence interval (n - 1 degrees of
    freedom). One value has no interval: None."""
    if not values:
        return None, None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    from scipy import stats

    sem = statistics.stdev(values) / math.sqrt(len(values))
    return mean, float(stats.t.ppf((1 + confidence) / 2, len(values) - 1) * sem)


SUMMARY_COLUMNS = ("method", "keep_ratio", "seeds", "seeds_ok")


def numeric_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The result columns (always, so the summary's columns do not depend on what was
    measured), then any other column holding numbers in every row that has it."""
    extra = sorted({k for r in rows for k in r} - set(RESULT_COLUMNS))
    numeric = [k for k in extra if any(r.get(k) not in (None, "") for r in rows)
               and all(_is_number(r.get(k)) for r in rows if r.get(k) not in (None, ""))]
    return [k for k in (*RESULT_COLUMNS, *numeric) if k not in NOT_AGGREGATED]


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


# Compared with all-data fine-tuning and with the oracle seed by seed: every method of a seed
# trains on the same sampled rows, so the seed-to-seed spread of the data cancels in the
# difference. All data is what selection must beat; the oracle is the most any filter can keep.
PAIRED_COLUMNS = ("safety_refusal_rate", "heldout_refusal_rate", "over_refusal_rate",
                  "task_accuracy", "task_loss", "task_token_accuracy")
PAIRED_WITH = ("all", "oracle")


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method and keep ratio: for every numeric column over the finished seeds,
    COLUMN_mean and COLUMN_ci95 (half-width of the 95% interval; empty for one seed); for the
    PAIRED_COLUMNS also COLUMN_vs_all_mean / _ci95, the method minus all data per seed, and
    likewise COLUMN_vs_oracle_… (empty where the grid has no oracle cells)."""
    ok_rows = [r for r in rows if r["status"] == "ok"]
    columns = numeric_columns(ok_rows)
    references = {name: {int(r["seed"]): r for r in ok_rows if r["method"] == name}
                  for name in PAIRED_WITH}
    out = []
    for (method, ratio), group in group_rows(rows).items():
        ok = [r for r in group if r["status"] == "ok"]
        summary: dict[str, Any] = {"method": method, "keep_ratio": ratio, "seeds": len(group),
                                   "seeds_ok": len(ok)}
        for column in columns:
            summary[f"{column}_mean"], summary[f"{column}_ci95"] = mean_ci(_values(ok, column))
        for name, reference in references.items():
            for column in PAIRED_COLUMNS:
                differences = ([] if method == name
                               else paired_differences(ok, reference, column))
                paired = f"{column}_vs_{name}"
                summary[f"{paired}_mean"], summary[f"{paired}_ci95"] = mean_ci(differences)
        out.append(summary)
    return out


def paired_differences(group: list[dict[str, Any]], reference: dict[int, dict[str, Any]],
                       column: str) -> list[float]:
    """The group's value minus the reference cell's of the same seed, for every seed both
    measured. A seed-independent cell (the base model, run once) is compared with every
    seed of the reference."""
    by_seed = {int(r["seed"]): r for r in group}
    if group and group[0]["method"] == BASE:
        by_seed = dict.fromkeys(reference, group[0])
    out = []
    for seed, row in sorted(by_seed.items()):
        if seed not in reference:
            continue
        pair = _values([row, reference[seed]], column)
        if len(pair) == 2:
            out.append(pair[0] - pair[1])
    return out


def group_rows(rows: list[dict[str, Any]]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    """Rows by (method, keep ratio), in method order then ratio."""
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], float(row["keep_ratio"])), []).append(row)
    return dict(sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0])))
