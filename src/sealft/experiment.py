"""`sealft experiment`: the paper's comparison grid — selectors × keep ratios × seeds, each cell
selected, fine-tuned and evaluated, then tabulated and plotted.

Layout of OUTPUT_DIR:
  config.yaml                 the resolved arguments (a rerun must agree on everything but the
                              grid itself: methods, keep_ratios, seeds may grow)
  cells/<method>-keep<r>-seed<s>/
      select/ finetune/ eval/  the three stage dirs (each with its own summary.json)
      done.json               the cell's result row; its presence marks the cell finished
      error.json              the last failure (message + traceback), if any
  results.csv                 one row per cell (failed cells too, with their error)
  results.md                  one row per method and keep ratio, mean (± sd) over seeds
  ratio_sweep.png             safety refusal and task accuracy against keep ratio

Reruns skip finished cells and continue unfinished ones stage by stage (a finished selection is
not redone, SEAL resumes from its checkpoint, evaluation reuses its generation cache). A failing
cell is recorded and the grid moves on; the next rerun retries it.

All-data methods (`all`, `safeinstr`) do not depend on the keep ratio: they run once per seed at
keep ratio 1 and show as horizontal lines in the plot.
"""

from __future__ import annotations

import csv
import gc
import json
import math
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
from sealft.baselines import SAFEINSTR_FILE, write_safeinstr
from sealft.errors import ConfigError
from sealft.evaluate import EvaluateArgs, evaluate
from sealft.finetune import FinetuneArgs, run_finetune
from sealft.io import prepare_output_dir, record_output, write_json, write_yaml
from sealft.select import METHODS as SELECT_METHODS
from sealft.select import SelectArgs, run_select

# SEAL variants: `seal` runs the configured algorithm (select.algorithm, the product default
# unless set); the others pin one.
SEAL_ALGORITHMS = {"seal": None, "seal-penalty": "penalty",
                   "seal-memory-efficient": "memory-efficient", "seal-safety-step": "safety-step"}
SELECTORS = ("all", "random", "dsir", "reference-loss", *SEAL_ALGORITHMS)
METHODS = ("all", "random", "dsir", "reference-loss", "seal", "safeinstr", "seal+safeinstr")
SAFEINSTR = "safeinstr"
SELECTOR_NAMES = SELECT_METHODS  # keys of method_select: what `sealft select --method` takes
# Grid fields: a rerun may change them (to extend the grid); everything else must match.
GRID_FIELDS = ("methods", "keep_ratios", "seeds", "overwrite", "plot")
METRIC_COLUMNS = ("safety_refusal_rate", "over_refusal_rate", "task_accuracy", "win_rate")
RESULT_COLUMNS = (
    "method", "keep_ratio", "seed", "status", *METRIC_COLUMNS, "safety_harmfulness_rate",
    "select_seconds", "finetune_seconds", "evaluate_seconds", "peak_memory_mb", "rows", "kept",
    "safety_added", "unsafe_removed_share", "auroc_unsafe_low_weight", "win_rate_reference",
    "error", "cell_dir",
)


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
    """Comma-separated: all, random, dsir, reference-loss, seal (select.algorithm),
    seal-penalty, seal-memory-efficient, seal-safety-step, safeinstr (= all + safety mix),
    SELECTOR+safeinstr."""
    keep_ratios: tuple[float, ...] = (0.8,)
    """Keep ratios to sweep (all-data methods run once, at 1)."""
    seeds: tuple[int, ...] = (0,)
    """Seeds: each cell's selection and fine-tuning seed."""
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
    weighted: bool = False
    """Weight the fine-tuning loss by the learned weights (not with +safeinstr methods)."""
    plot: bool = True
    """Write ratio_sweep.png."""
    overwrite: bool = False
    """Delete the output dir's previous contents instead of resuming."""

    def __post_init__(self) -> None:
        cfg.require(bool(self.output_dir), "output_dir", "required")
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
        return self.selector == "all"


def parse_method(name: str) -> MethodSpec:
    base, plus, mix = name.partition("+")
    if name == SAFEINSTR:
        base, plus, mix = "all", "+", SAFEINSTR
    if base not in SELECTORS or (plus and mix != SAFEINSTR):
        raise ConfigError(f"--methods: unknown method {name!r}; use {', '.join(METHODS)} or "
                          "SELECTOR+safeinstr")
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
    select: SelectArgs
    finetune: FinetuneArgs
    evaluate: EvaluateArgs


# ---------------------------------------------------------------------------------------------
# Grid and stage arguments
# ---------------------------------------------------------------------------------------------


def cell_name(method: str, keep_ratio: float, seed: int) -> str:
    return f"{method}-keep{keep_ratio:g}-seed{seed}"


def grid(args: ExperimentArgs) -> list[Cell]:
    """Cells in run order: per seed, the all-data SFT cell first (the win-rate reference)."""
    cells = []
    for seed in args.seeds:
        specs = sorted((parse_method(m) for m in args.methods), key=lambda s: s.name != "all")
        for spec in specs:
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
    evaluation = cfg.build(EvaluateArgs, eval_defaults, args.evaluate, {
        "adapter": str(cell.folder / "finetune" / "adapter"),
        "output_dir": str(cell.folder / "eval"), "overwrite": False})
    return CellStages(select, finetune, evaluation)


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


def reuse_twin_selection(cell: Cell, select: SelectArgs) -> dict[str, Any] | None:
    """A SELECTOR+safeinstr cell selects exactly what its SELECTOR cell selected when their
    options agree: copy that finished selection (SEAL's is the expensive stage) instead of
    recomputing it. Returns the copied summary, or None when there is no such twin."""
    if not cell.method.safeinstr:
        return None
    base = cell.method.name.partition("+")[0] if "+" in cell.method.name else "all"
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
    shutil.copytree(twin, tmp, ignore=shutil.ignore_patterns("checkpoint*", "logs"))
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
    return {
        "method": cell.method.name, "keep_ratio": cell.keep_ratio, "seed": cell.seed,
        "status": "ok", **{k: evaluation.get(k) for k in METRIC_COLUMNS},
        "safety_harmfulness_rate": evaluation.get("safety_harmfulness_rate"),
        "select_seconds": select.get("wall_seconds"),
        "finetune_seconds": finetune.get("wall_seconds"),
        "evaluate_seconds": evaluation.get("wall_seconds"),
        "peak_memory_mb": max((p for p in peaks if p is not None), default=None),
        "rows": select.get("rows"), "kept": select.get("kept"),
        "safety_added": mix.get("safety_added"),
        "unsafe_removed_share": labels.get("unsafe_removed_share"),
        "auroc_unsafe_low_weight": labels.get("auroc_unsafe_low_weight"),
        "win_rate_reference": win_reference or ("default" if evaluation.get("win_rate")
                                                is not None else None),
        "error": None, "cell_dir": str(cell.folder),
    }


def failed_row(cell: Cell, err: BaseException) -> dict[str, Any]:
    row = dict.fromkeys(RESULT_COLUMNS)
    row.update(method=cell.method.name, keep_ratio=cell.keep_ratio, seed=cell.seed,
               status="failed", error=f"{type(err).__name__}: {err}", cell_dir=str(cell.folder))
    return row


CellRunner = Callable[[ExperimentArgs, Cell, CellStages], dict[str, Any]]


def run_or_record(args: ExperimentArgs, cell: Cell, runner: CellRunner = run_cell) -> dict:
    """The cell's result; a failure becomes a row with its error instead of stopping the grid."""
    done = cell.folder / "done.json"
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
        old, new = cfg.load_yaml(previous), cfg.to_dict(args)
        changed = [k for k in new if k not in GRID_FIELDS and old.get(k) != new[k]]
        if changed:
            raise ConfigError(
                f"--output-dir {out} holds an experiment with different {', '.join(changed)}; "
                "use another dir or --overwrite (methods, keep_ratios and seeds may change)")
    out = prepare_output_dir(out, args.overwrite, resume=not args.overwrite, stage="experiment",
                             inputs=cfg.input_paths(args))
    write_yaml(out / "config.yaml", cfg.to_dict(args))
    return out


def run_experiment(args: ExperimentArgs, runner: CellRunner = run_cell) -> list[dict[str, Any]]:
    """Run (or resume) the grid; returns one result row per cell and writes the reports."""
    cells = grid(args)
    for cell in cells:  # validate every cell's options before spending any compute
        stage_args(args, cell, reference_eval_dir(args, cell))
    out = prepare_experiment_dir(args)
    rows = []
    for cell in cells:
        rows.append(run_or_record(args, cell, runner))
        write_reports(out, rows, plot=False)  # partial results survive an interrupted grid
    write_reports(out, rows, plot=args.plot)
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"[experiment] {len(rows) - len(failed)} of {len(rows)} cells finished; results in "
          f"{out / 'results.md'}", file=sys.stderr)
    return rows


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


def write_reports(out: Path, rows: list[dict[str, Any]], plot: bool = True) -> None:
    # Written without io's helpers: listed in the dir's manifest first (--overwrite deletes them).
    record_output(out, "results.csv", "results.csv.tmp", "results.md", "ratio_sweep.png",
                  "ratio_sweep.tmp.png")
    write_csv(out / "results.csv", rows)
    (out / "results.md").write_text(results_markdown(rows), encoding="utf-8")
    if plot and any(r["status"] == "ok" for r in rows):
        plot_ratio_sweep(rows, out / "ratio_sweep.png")


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = list(RESULT_COLUMNS) + sorted({k for r in rows for k in r} - set(RESULT_COLUMNS))
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    tmp.replace(path)


def _values(rows: list[dict[str, Any]], key: str) -> list[float]:
    out = []
    for row in rows:
        value = row.get(key)
        if value is not None and value != "" and not math.isnan(float(value)):
            out.append(float(value))
    return out


def _mean_sd(values: list[float], scale: float = 1.0, digits: int = 1, sd: bool = True) -> str:
    if not values:
        return "–"
    text = f"{statistics.mean(values) * scale:.{digits}f}"
    if sd and len(values) > 1:
        text += f" ± {statistics.stdev(values) * scale:.{digits}f}"
    return text


def group_rows(rows: list[dict[str, Any]]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    """Finished rows by (method, keep ratio), in method order then ratio."""
    order = {m: i for i, m in enumerate((*METHODS, "seal-penalty"))}
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], float(row["keep_ratio"])), []).append(row)
    return dict(sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0])))


TABLE_HEADER = ("Method", "Keep", "Seeds ok", "Safety refusal % ↑", "Over-refusal % ↓",
                "Task acc. % ↑", "Win rate vs all-data SFT % ↑", "Select + FT time (s)",
                "Peak memory (MB)")


def results_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["# Experiment results", "",
             "Mean (± sd over seeds). Refusal on harmful prompts, over-refusal on benign "
             "prompts, SST-2 accuracy, win rate against all-data SFT (needs the helpfulness "
             "suite and an LLM judge). Peak memory: GPU peak per cell; on CPU the process "
             "high-water mark so far.", "",
             "| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    for (method, ratio), group in group_rows(rows).items():
        ok = [r for r in group if r["status"] == "ok"]
        time_text = (f"{_mean_sd(_values(ok, 'select_seconds'), digits=0, sd=False)} + "
                     f"{_mean_sd(_values(ok, 'finetune_seconds'), digits=0, sd=False)}"
                     ) if ok else "–"
        cells = [method, f"{ratio:g}", f"{len(ok)}/{len(group)}",
                 *(_mean_sd(_values(ok, k), 100) for k in METRIC_COLUMNS), time_text,
                 _mean_sd(_values(ok, "peak_memory_mb"), digits=0, sd=False)]
        lines.append("| " + " | ".join(cells) + " |")
    failures = [r for r in rows if r["status"] != "ok"]
    if failures:
        lines += ["", "## Failed cells (rerun the experiment to retry them)", ""]
        lines += [f"- `{Path(str(r['cell_dir'])).name}`: {r['error']}" for r in failures]
    return "\n".join(lines) + "\n"


def plot_ratio_sweep(rows: list[dict[str, Any]], path: Path) -> None:
    """Safety refusal and task accuracy against keep ratio, one line per method; all-data
    methods (ratio-independent) as dashed horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_rows([r for r in rows if r["status"] == "ok"])
    ratios = sorted({ratio for _, ratio in groups} | {1.0})
    span = (min(ratios) - 0.02, 1.02)
    panels = (("safety_refusal_rate", "Safety: refusal on harmful prompts (%)"),
              ("task_accuracy", "Task: SST-2 accuracy (%)"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for method in dict.fromkeys(m for m, _ in groups):
            _plot_method(ax, method, groups, key, span)
        ax.set(title=title, xlabel="keep ratio", xlim=span)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4) or 1,
               frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def _plot_method(ax, method: str, groups: dict, key: str, span: tuple[float, float]) -> None:
    points = [(ratio, statistics.mean(v) * 100) for (m, ratio), g in sorted(groups.items())
              if m == method and (v := _values(g, key))]
    if not points:
        return
    if parse_method(method).ratio_free:
        ax.hlines(points[0][1], *span, linestyles="dashed", label=method,
                  colors=_color(method))
        return
    xs, ys = zip(*points, strict=True)
    ax.plot(xs, ys, marker="o", label=method, color=_color(method))


def _color(method: str) -> str:
    palette = ("#444444", "#999999", "#1f77b4", "#9467bd", "#d62728", "#ff7f0e", "#2ca02c",
               "#8c564b", "#e377c2")
    known = (*METHODS, "seal-penalty")
    return palette[known.index(method) % len(palette)] if method in known else "#17becf"
