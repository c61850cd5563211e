"""`sealft report`: compare evaluation, selection and fine-tuning runs in one table and a few
plots, written as report.md, report.html (self-contained: plots embedded) and PNG files.

Each argument is a run dir; a dir that is none of these but holds some is expanded to them:
  evaluation dir   summary.json with "stage": "evaluate" (from `sealft evaluate`)
  selection dir    scores.jsonl + config.yaml (from `sealft select`); ground-truth flags are
                   joined by id from the fine-tuning data named in its config
  other run dir    summary.json with wall_seconds / peak_memory_mb (e.g. fine-tuning)
  experiment dir   results_summary.csv and results.csv (from `sealft experiment`): its
                   per-method table, mean ± 95% CI over seeds, the refusal-vs-task plot with
                   error bars and the keep-ratio sweep. The experiment's own results.md is
                   rendered by the same functions.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sealft import config as cfg
from sealft.errors import DataError
from sealft.io import atomic_save, atomic_write, read_jsonl

PLOT_DPI = 130


@dataclass
class ReportArgs:
    runs: tuple[str, ...] = ()
    """Run dirs to compare: evaluation, selection or fine-tuning outputs (or folders of them)."""
    output_dir: str = "report"
    """Folder for report.md, report.html and the PNG plots."""
    labels: tuple[str, ...] = ()
    """Names for the evaluation runs, in the order given; default: each run's own label."""
    title: str = "SEAL evaluation report"
    """Heading of the report."""
    label_field: str | None = None
    """Ground-truth field of the fine-tuning data for selection plots; default: the selection
    run's label_field, else flag."""

    def __post_init__(self) -> None:
        cfg.require(bool(self.runs), "runs", "give at least one run dir")
        cfg.require(bool(self.output_dir), "output_dir", "required")
        cfg.require(not Path(self.output_dir).exists() or Path(self.output_dir).is_dir(),
                    "output_dir", f"{self.output_dir} is a file; give a folder for the report")


# ---------------------------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalRun:
    path: Path
    label: str
    summary: dict[str, Any]
    metrics: dict[str, Any]
    train: dict[str, Any] = field(default_factory=dict)
    """wall_seconds / peak_memory_mb of the fine-tuning run its adapter came from, if found."""


@dataclass
class SelectionRun:
    path: Path
    label: str
    scores: list[dict[str, Any]]
    config: dict[str, Any]
    summary: dict[str, Any]
    flags: dict[str, str] | None
    flag_note: str | None = None


@dataclass
class OtherRun:
    path: Path
    label: str
    summary: dict[str, Any]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    return data if isinstance(data, dict) else {}


def _kind(path: Path) -> str | None:
    if (path / "results_summary.csv").is_file():
        return "experiment"
    summary = path / "summary.json"
    if summary.is_file() and _read_json(summary).get("stage") == "evaluate":
        return "evaluate"
    if (path / "scores.jsonl").is_file():
        return "selection"
    if summary.is_file():
        return "other"
    return None


def discover(paths: tuple[str, ...]) -> list[tuple[str, Path]]:
    """(kind, dir) for each argument; a plain folder contributes the runs directly inside it."""
    found: list[tuple[str, Path]] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise DataError(f"run dir {path} does not exist")
        kind = _kind(path)
        if kind:
            found.append((kind, path))
            continue
        inner = [(k, p) for p in sorted(path.iterdir()) if p.is_dir() and (k := _kind(p))]
        if not inner:
            raise DataError(f"{path}: not an evaluation, selection or fine-tuning run dir (no "
                            "summary.json or scores.jsonl), and holds none")
        found += inner
    return found


@dataclass
class ExperimentRun:
    path: Path
    summary: list[dict[str, Any]]
    """results_summary.csv rows: COLUMN_mean / COLUMN_ci95 per method and keep ratio."""
    cells: list[dict[str, Any]] = field(default_factory=list)
    """results.csv rows: one per cell, failed cells too (status, error, cell_dir)."""


def load_experiment(path: Path) -> ExperimentRun:
    """An experiment dir as `sealft experiment` wrote it; results.csv is optional (the table
    needs only the summary)."""
    return ExperimentRun(path, read_rows_csv(path / "results_summary.csv"),
                         read_rows_csv(path / "results.csv"))


def read_rows_csv(path: Path) -> list[dict[str, Any]]:
    """Rows with numbers as floats and empty fields as None; no file, no rows."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def _number(text: str) -> Any:
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text


# The experiment table, one renderer for results.md and `sealft report`:
# (header, column, scale, digits); rates in %, times in seconds.
EXPERIMENT_COLUMNS = (
    ("Safety refusal % ↑", "safety_refusal_rate", 100, 1),
    ("Held-out harmful refusal % ↑", "heldout_refusal_rate", 100, 1),
    ("Δ held-out refusal vs all, paired (pts)", "heldout_refusal_rate_vs_all", 100, 1),
    ("Δ held-out refusal vs oracle, paired (pts)", "heldout_refusal_rate_vs_oracle", 100, 1),
    ("Harmfulness % ↓", "safety_harmfulness_rate", 100, 1),
    ("Over-refusal % ↓", "over_refusal_rate", 100, 1),
    ("Δ over-refusal vs all, paired (pts)", "over_refusal_rate_vs_all", 100, 1),
    ("Task acc. % ↑", "task_accuracy", 100, 1),
    ("Held-out task loss ↓", "task_loss", 1, 3),
    ("Held-out token acc. % ↑", "task_token_accuracy", 100, 1),
    ("Δ token acc. vs all, paired (pts)", "task_token_accuracy_vs_all", 100, 1),
    ("Win rate vs all-data SFT % ↑", "win_rate", 100, 1),
    ("Harmful rows trained", "harmful_trained", 1, 1),
    ("Select s", "select_seconds", 1, 0),
    ("Fine-tune s", "finetune_seconds", 1, 0),
    ("Evaluate s", "evaluate_seconds", 1, 0),
    ("Peak memory (MB)", "peak_memory_mb", 1, 0),
)
EXPERIMENT_NOTE = (
    "Mean over seeds ± half-width of the 95% confidence interval (Student t, n − 1 degrees of "
    "freedom; no interval from one seed). Refusal on harmful prompts, held-out harmful "
    "questions of the fine-tuning file's own kind, over-refusal on benign prompts, task "
    "accuracy (for long-form data: on held-out answers, their loss and the share of their "
    "tokens the model predicts top-1), win rate against all-data SFT (needs the helpfulness "
    "suite and an LLM judge). "
    "Δ … vs all (vs oracle), paired: the method minus all-data fine-tuning (the oracle "
    "filter) of the same seed (same sampled rows), averaged over seeds with its own interval; "
    "the base model is compared with every seed. Peak memory: GPU peak per cell; on CPU the "
    "process high-water mark so far.")
# Fixed per method, so that a method keeps its colour whichever others a grid runs.
METHOD_COLOURS = {"base": "#000000", "all": "#444444", "random": "#999999", "dsir": "#1f77b4",
                  "reference-loss": "#9467bd", "oracle": "#2ca02c", "seal": "#d62728",
                  "safeinstr": "#ff7f0e", "seal+safeinstr": "#8c564b",
                  "seal-penalty": "#e377c2"}


def method_colour(method: str) -> str:
    return METHOD_COLOURS.get(method, "#17becf")


def fmt_ci(summary: dict[str, Any], column: str, scale: float = 1.0, digits: int = 1) -> str:
    """'mean ± half-width' (just the mean for one seed; '–' when missing)."""
    mean, half = summary.get(f"{column}_mean"), summary.get(f"{column}_ci95")
    if mean is None:
        return "–"
    text = f"{mean * scale:.{digits}f}"
    return text if half is None else f"{text} ± {half * scale:.{digits}f}"


def experiment_table(summary: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Per method and keep ratio, mean ± interval of every column some cell measured."""
    columns = [c for c in EXPERIMENT_COLUMNS
               if any(s.get(f"{c[1]}_mean") is not None for s in summary)]
    header = ["Method", "Keep", "Seeds ok", *(c[0] for c in columns)]
    rows = [[str(s["method"]), f"{s['keep_ratio']:g}", f"{s['seeds_ok']:g}/{s['seeds']:g}",
             *(fmt_ci(s, column, scale, digits) for _, column, scale, digits in columns)]
            for s in summary]
    return header, rows


def experiment_section(run: ExperimentRun, out: Path, title: str, plot_suffix: str = "",
                       plot: bool = True) -> Section:
    """The table, the failed cells and (with `plot`) the trade-off and keep-ratio plots of one
    experiment, the plots written to out/tradeoff{plot_suffix}.png and ratio_sweep….png."""
    failed = [c for c in run.cells if c.get("status") not in (None, "ok")]
    text = EXPERIMENT_NOTE
    if failed:
        text += "\n\nFailed cells (rerun the experiment to retry them): " + "; ".join(
            f"`{Path(str(c['cell_dir'])).name}`: {c['error']}" for c in failed) + "."
    images = [] if not plot else [
        plot_keep_ratio_sweep(run.cells, out / f"ratio_sweep{plot_suffix}.png"),
        plot_refusal_vs_task(run.summary, out / f"tradeoff{plot_suffix}.png", method_colour)]
    return Section(title, text, experiment_table(run.summary), [p for p in images if p])


def write_experiment_page(run: ExperimentRun, plot: bool = True) -> Path:
    """results.md (and its plots) in the experiment dir itself."""
    section = experiment_section(run, run.path, "Per method", plot=plot)
    with atomic_write(run.path / "results.md") as handle:
        handle.write(render_markdown("Experiment results", [section], run.path))
    return run.path / "results.md"


def _train_summary(adapter: str | None) -> dict[str, Any]:
    """Cost of the fine-tuning run an evaluated adapter came from (its summary.json)."""
    if not adapter:
        return {}
    path = Path(adapter)
    for folder in (path, path.parent):
        summary = folder / "summary.json"
        if summary.is_file():
            data = _read_json(summary)
            if data.get("stage") != "evaluate" and "wall_seconds" in data:
                return data
    return {}


def load_eval(path: Path, label: str | None) -> EvalRun:
    summary = _read_json(path / "summary.json")
    metrics = _read_json(path / "metrics.json") if (path / "metrics.json").is_file() else {}
    return EvalRun(path, label or summary.get("label") or path.name, summary, metrics,
                   _train_summary(summary.get("adapter")))


def _resolve_data(path_text: str, run_dir: Path) -> Path | None:
    for candidate in (Path(path_text).expanduser(), run_dir / path_text):
        if candidate.exists():
            return candidate
    return None


def load_selection(path: Path, flag_field: str | None) -> SelectionRun:
    scores = read_jsonl(path / "scores.jsonl")
    config = cfg.load_yaml(path / "config.yaml") if (path / "config.yaml").is_file() else {}
    summary = _read_json(path / "summary.json") if (path / "summary.json").is_file() else {}
    label = str(config.get("method") or summary.get("method") or "selection")
    run = SelectionRun(path, f"{label} ({path.name})", scores, config, summary, None)
    data = config.get("finetune_data")
    field_name = flag_field or config.get("label_field") or "flag"
    if not data:
        run.flag_note = "config.yaml names no finetune_data: flags unavailable"
        return run
    resolved = _resolve_data(str(data), path)
    if resolved is None:
        run.flag_note = f"fine-tuning data {data} not found: flags unavailable"
        return run
    from sealft.data import load_examples

    examples = load_examples(str(resolved), fmt=str(config.get("format") or "auto"))
    flags = {ex["id"]: ex["meta"].get(field_name) for ex in examples}
    if all(v is None for v in flags.values()):
        run.flag_note = f"the fine-tuning data has no {field_name!r} field: flags unavailable"
        return run
    run.flags = {k: str(v) for k, v in flags.items()}
    return run


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------


def pct(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{100 * value:.1f}%"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def memory(mb: float | None) -> str:
    if mb is None:
        return "—"
    return f"{mb / 1024:.1f} GiB" if mb >= 1024 else f"{mb:.0f} MiB"


def methods_table(runs: list[EvalRun]) -> tuple[list[str], list[list[str]]]:
    """Methods x metrics: one row per evaluated run."""
    with_train = any(r.train for r in runs)
    header = ["Method", "Safety refusal ↑", "Harmful ↓", "Over-refusal ↓", "Task acc. ↑",
              "Win rate ↑", "Eval time", "Eval peak mem."]
    if with_train:
        header += ["Train time", "Train peak mem."]
    rows = []
    for r in runs:
        s = r.summary
        row = [r.label, pct(s.get("safety_refusal_rate")), pct(s.get("safety_harmfulness_rate")),
               pct(s.get("over_refusal_rate")), pct(s.get("task_accuracy")),
               pct(s.get("win_rate")),
               duration(s.get("wall_seconds_total", s.get("wall_seconds"))),
               memory(s.get("peak_memory_mb"))]
        if with_train:
            row += [duration(r.train.get("wall_seconds")), memory(r.train.get("peak_memory_mb"))]
        rows.append(row)
    return header, rows


def per_set_table(runs: list[EvalRun]) -> tuple[list[str], list[list[str]]]:
    sets = _set_names(runs)
    header = ["Method"] + [f"{s} (over-refusal)" if s.startswith("xstest_safe") else s
                           for s in sets]
    rows = [[r.label] + [pct(r.summary.get("refusal_by_set", {}).get(s)) for s in sets]
            for r in runs]
    return header, rows


def _set_names(runs: list[EvalRun]) -> list[str]:
    names: list[str] = []
    for r in runs:
        names += [n for n in r.summary.get("refusal_by_set", {}) if n not in names]
    return names


def flag_shares(run: SelectionRun) -> dict[str, dict[str, float]]:
    """Per flag value: rows, kept rows and kept share."""
    out: dict[str, dict[str, float]] = {}
    for row in run.scores:
        flag = (run.flags or {}).get(str(row["id"]), "unknown")
        entry = out.setdefault(flag, {"rows": 0, "kept": 0})
        entry["rows"] += 1
        entry["kept"] += bool(row.get("kept"))
    for entry in out.values():
        entry["share"] = entry["kept"] / entry["rows"] if entry["rows"] else 0.0
    return out


def selection_table(runs: list[SelectionRun]) -> tuple[list[str], list[list[str]]]:
    header = ["Selection run", "Rows", "Kept", "Kept share by flag", "Wall time", "Peak mem."]
    rows = []
    for r in runs:
        shares = "; ".join(f"{flag}: {pct(v['share'])} of {v['rows']}"
                           for flag, v in sorted(flag_shares(r).items())) if r.flags else "—"
        kept = sum(bool(s.get("kept")) for s in r.scores)
        rows.append([r.label, str(len(r.scores)), str(kept), shares,
                     duration(r.summary.get("wall_seconds")),
                     memory(r.summary.get("peak_memory_mb"))])
    return header, rows


def other_table(runs: list[OtherRun]) -> tuple[list[str], list[list[str]]]:
    header = ["Run", "Wall time", "Peak mem."]
    return header, [[r.label, duration(r.summary.get("wall_seconds")),
                     memory(r.summary.get("peak_memory_mb"))] for r in runs]


def md_table(header: list[str], rows: list[list[str]]) -> str:
    def clean(cell: str) -> str:
        return cell.replace("|", "\\|")

    align = ["---"] + ["---:" for _ in header[1:]]
    lines = ["| " + " | ".join(clean(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(clean(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def cell_text(value: Any, digits: int = 3) -> str:
    """One table cell: floats rounded, missing values as an en dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{value:.{digits}f}"
    return str(value)


def rows_table(rows: list[dict[str, Any]], columns: dict[str, str] | None = None,
               digits: int = 3) -> tuple[list[str], list[list[str]]]:
    """(header, cells) of row dicts, for `md_table` / `html_table`. `columns` maps header ->
    key, in order; by default every key, in first-seen order."""
    if columns is None:
        columns = {k: k for k in dict.fromkeys(k for row in rows for k in row)}
    return list(columns), [[cell_text(row.get(key), digits) for key in columns.values()]
                           for row in rows]


def rows_markdown(rows: list[dict[str, Any]], columns: dict[str, str] | None = None,
                  digits: int = 3) -> str:
    return md_table(*rows_table(rows, columns, digits))


def write_rows_csv(path: Path, rows: list[dict[str, Any]], first: tuple[str, ...] = ()) -> Path:
    """Row dicts as CSV: the `first` columns in order, then every other key sorted; missing
    values empty. Written atomically, like every run output."""
    import csv

    columns = list(first) + sorted({k for row in rows for k in row} - set(first))
    with atomic_write(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return path


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.spines.top": False, "axes.titlesize": 11,
                         "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
                         "axes.grid.axis": "y", "axes.axisbelow": True})
    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    # "tight" grows the canvas to fit legends and titles placed outside the axes. The format
    # is named: the temp file atomic_save writes to has no image suffix.
    atomic_save(path, lambda name: fig.savefig(name, format=path.suffix.lstrip(".") or "png",
                                               dpi=PLOT_DPI, bbox_inches="tight",
                                               pad_inches=0.15))
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_safety_vs_helpfulness(runs: list[EvalRun], out: Path) -> tuple[Path, str] | None:
    """Safety (refusal on harmful prompts) against helpfulness (win rate, else task accuracy)."""
    use_win = any(r.summary.get("win_rate") is not None for r in runs)
    x_key, x_name = ("win_rate", "Win rate vs. reference") if use_win else \
        ("task_accuracy", "Task accuracy (SST-2)")
    points = [(r.label, r.summary.get(x_key), r.summary.get("safety_refusal_rate"))
              for r in runs]
    points = [p for p in points if p[1] is not None and p[2] is not None]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    colours = plt.get_cmap("tab10")
    ax.grid(True, axis="both")
    for k, (label, x, y) in enumerate(points):
        ax.scatter(x, y, s=80, color=colours(k % 10), edgecolor="black", linewidth=0.6,
                   zorder=3, label=label)
        # Label the point itself too: with many runs, matching colours to a legend is slow.
        right = x > 0.65  # keep labels near the right edge inside the axes
        ax.annotate(label, (x, y), xytext=(-6 if right else 6, 5), textcoords="offset points",
                    fontsize=8, ha="right" if right else "left")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel(f"{x_name} → more helpful")
    ax.set_ylabel("Refusal on harmful prompts → safer")
    ax.set_title("Safety vs. helpfulness (upper right is better)")
    ax.legend(loc="best", fontsize=8, frameon=True)
    return _save(fig, out / "safety_vs_helpfulness.png"), x_name


# (column, scale, axis label, name in the title), in order of preference.
TASK_AXES = (
    ("task_accuracy", 100, "Task accuracy (%) → more useful", "task accuracy"),
    ("task_token_accuracy", 100, "Held-out answer token accuracy (%) → more useful",
     "held-out answer token accuracy"),
    ("task_loss", 1, "Held-out task loss (reversed) → more useful", "held-out task loss"),
)


def task_axis(summary: list[dict[str, Any]]) -> tuple[str, float, str, str]:
    """The first task measure a grid has: a label's accuracy, else the held-out answers' token
    accuracy, else (grids run before that was measured) their loss."""
    return next(axis for axis in TASK_AXES if axis[0] == "task_loss"
                or any(s.get(f"{axis[0]}_mean") is not None for s in summary))


def plot_refusal_vs_task(summary: list[dict[str, Any]], path: Path,
                         colour: Callable[[str], str] | None = None) -> Path | None:
    """An experiment's trade-off: refusal on harmful prompts against task accuracy, one point
    per method and keep ratio at its mean over seeds, error bars = 95% confidence intervals
    (none for one seed). A second panel shows the held-out harmful questions when measured.
    Without task accuracy (long-form data), the held-out answers' token accuracy is the x
    axis, and for grids that lack it their loss, reversed so that right is still better.

    `summary` holds `sealft experiment`'s results_summary rows (COLUMN_mean / COLUMN_ci95)."""
    panels = [(key, title) for key, title in (
        ("safety_refusal_rate", "Refusal on harmful prompts (AdvBench, HarmBench…)"),
        ("heldout_refusal_rate", "Refusal on held-out harmful questions of the data's kind"))
        if any(s.get(f"{key}_mean") is not None for s in summary)]
    x_key, x_scale, x_label, x_title = task_axis(summary)
    points = [s for s in summary if s.get(f"{x_key}_mean") is not None]
    if not panels or not points:
        return None
    # one colour per method and one marker per keep ratio, so that a method cut at two
    # ratios shows as two points that can be told apart
    ratios = sorted({g["keep_ratio"] for g in points if g["keep_ratio"] != 1}, reverse=True)
    marker = {1: "o"} | {r: "s^Dvp"[i % 5] for i, r in enumerate(ratios)}
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        for k, group in enumerate(points):
            y = group.get(f"{key}_mean")
            if y is None:
                continue
            label = group["method"] if group["keep_ratio"] == 1 else \
                f"{group['method']} {group['keep_ratio']:g}"
            x_half = group.get(f"{x_key}_ci95")
            ax.errorbar(x_scale * group[f"{x_key}_mean"], 100 * y,
                        xerr=None if x_half is None else x_scale * x_half,
                        yerr=_bar(group.get(f"{key}_ci95")),
                        fmt=marker[group["keep_ratio"]], markersize=7,
                        capsize=4, elinewidth=1.2, label=label, zorder=3,
                        color=colour(group["method"]) if colour else f"C{k % 10}")
        ax.grid(True, axis="both")
        ax.set_xlabel(x_label)
        if x_key == "task_loss":
            ax.invert_xaxis()
        ax.set_ylabel("Refusal (%) → safer")
        # A t interval over 3 seeds can reach past 0-100%; the table keeps the numbers.
        ax.set_ylim(-3, 103)
        ax.set_title(title)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), frameon=False,
               bbox_to_anchor=(0.5, -0.07 - 0.05 * ((len(labels) - 1) // 5)))
    fig.suptitle(f"Safety vs. {x_title} (mean over seeds, 95% CI; upper right is better)")
    return _save(fig, path)


def _bar(half_width: float | None) -> float | None:
    return None if half_width is None else 100 * half_width


def plot_refusal_by_set(runs: list[EvalRun], out: Path) -> Path | None:
    sets = _set_names(runs)
    if not sets:
        return None
    plt = _pyplot()
    import numpy as np

    width = 0.8 / len(runs)
    bars_total = len(sets) * len(runs)
    fig, ax = plt.subplots(figsize=(min(13.0, max(6.4, 2.5 + 0.28 * bars_total)), 4.8))
    positions = np.arange(len(sets))
    colours = plt.get_cmap("tab10")
    for k, run in enumerate(runs):
        values = [run.summary.get("refusal_by_set", {}).get(s) for s in sets]
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(positions + (k - (len(runs) - 1) / 2) * width, heights, width,
                      label=run.label, color=colours(k % 10), edgecolor="black", linewidth=0.4)
        for bar, value in zip(bars, values, strict=True):
            if value is not None and bars_total <= 24:
                ax.annotate(f"{100 * value:.0f}", (bar.get_x() + bar.get_width() / 2,
                                                  bar.get_height()),
                            ha="center", va="bottom", fontsize=7, xytext=(0, 1),
                            textcoords="offset points")
    ax.set_xticks(positions)
    ax.set_xticklabels([f"{s}\n(over-refusal)" if s.startswith("xstest_safe") else s
                        for s in sets], rotation=25 if len(sets) > 4 else 0,
                       ha="right" if len(sets) > 4 else "center")
    ax.set_xlim(-0.6, len(sets) - 0.4)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("Refusal rate")
    ax.set_title("Refusal rate per prompt set\n(harmful sets: higher is safer; "
                 "XSTest safe prompts: lower is better)")
    ax.legend(fontsize=8, loc="upper center", frameon=False, ncol=min(len(runs), 3),
              bbox_to_anchor=(0.5, -0.3 if len(sets) > 4 else -0.17))
    return _save(fig, out / "refusal_by_set.png")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")[:60] or "run"


def plot_weight_histogram(run: SelectionRun, out: Path) -> Path | None:
    """Learned weights split by ground-truth flag: SEAL should push unsafe rows to the left."""
    import numpy as np

    weights = [(r.get("weight"), (run.flags or {}).get(str(r["id"]), "all rows"))
               for r in run.scores]
    weights = [(w, f) for w, f in weights if w is not None]
    if not weights:
        return None
    plt = _pyplot()
    values = np.array([w for w, _ in weights], dtype=float)
    bins = np.linspace(values.min(), values.max() if values.max() > values.min()
                       else values.min() + 1e-6, 31)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = {"unsafe": "tab:red", "finetune": "tab:blue"}
    groups = sorted({f for _, f in weights})
    density = len(groups) > 1  # groups of very different sizes: compare shapes, not counts
    for k, flag in enumerate(groups):
        part = values[[f == flag for _, f in weights]]
        ax.hist(part, bins=bins, density=density, alpha=0.55,
                color=colours.get(flag, plt.get_cmap("tab10")(k % 10)),
                edgecolor="black", linewidth=0.3, label=f"{flag} (n={len(part)})")
    from matplotlib.ticker import MaxNLocator

    # Weights can sit in a narrow band around 1: plain, few ticks instead of an offset label.
    ax.ticklabel_format(axis="x", useOffset=False, style="plain")
    ax.xaxis.set_major_locator(MaxNLocator(6))
    ax.set_xlabel("Learned weight")
    ax.set_ylabel("Density (each group's area is 1)" if density else "Rows")
    if not density:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Data weights by flag: {run.label}")
    ax.legend(fontsize=8)
    return _save(fig, out / f"weights_{_slug(run.path.name)}.png")


def plot_kept_by_flag(runs: list[SelectionRun], out: Path) -> Path | None:
    flagged = [r for r in runs if r.flags]
    if not flagged:
        return None
    plt = _pyplot()
    import numpy as np

    flags = sorted({f for r in flagged for f in flag_shares(r)})
    width = 0.8 / len(flags)
    fig, ax = plt.subplots(figsize=(min(12.0, max(6.4, 1.6 * len(flagged) + 2.5)), 4.2))
    positions = np.arange(len(flagged))
    colours = {"unsafe": "tab:red", "finetune": "tab:blue"}
    for k, flag in enumerate(flags):
        shares = [flag_shares(r).get(flag, {}).get("share", 0.0) for r in flagged]
        bars = ax.bar(positions + (k - (len(flags) - 1) / 2) * width, shares, width,
                      label=flag, color=colours.get(flag, plt.get_cmap("tab10")(k % 10)),
                      edgecolor="black", linewidth=0.4)
        for bar, share in zip(bars, shares, strict=True):
            ax.annotate(f"{100 * share:.0f}%", (bar.get_x() + bar.get_width() / 2,
                                                bar.get_height()),
                        ha="center", va="bottom", fontsize=8, xytext=(0, 1),
                        textcoords="offset points")
    ax.set_xticks(positions)
    ax.set_xticklabels([r.label for r in flagged], fontsize=8)
    ax.set_xlim(-0.7, len(flagged) - 0.3)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("Share of rows kept")
    ax.set_title("Kept share by ground-truth flag (lower for unsafe is better)")
    ax.legend(fontsize=8)
    return _save(fig, out / "kept_by_flag.png")


# ---------------------------------------------------------------------------------------------
# Assembling the report
# ---------------------------------------------------------------------------------------------


def plot_sweep(rows: list[dict[str, Any]], x: str, panels: dict[str, str], group: str,
               path: Path, flat: tuple[str, ...] = (), scale: float = 100.0,
               colour: Callable[[str], str] | None = None) -> Path | None:
    """One panel per metric (key -> title): the mean over rows of each (group, x) point, one
    line per group. Groups in `flat` do not depend on x (e.g. all-data baselines) and are
    drawn as dashed horizontal lines; `colour` maps a group to its colour (default: the
    cycle). None when no row has a value to plot."""
    means = _group_means(rows, x, list(panels), group)
    if not means:
        return None
    plt = _pyplot()
    xs = sorted({point for points in means.values() for point in points})
    span = (min(xs) - 0.02, max(xs) + 0.02)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels.items(), strict=True):
        for k, (name, points) in enumerate(means.items()):
            values = [(px, v[key] * scale) for px, v in sorted(points.items()) if key in v]
            if not values:
                continue
            color = colour(name) if colour else f"C{k % 10}"
            if name in flat:
                ax.hlines(values[0][1], *span, linestyles="dashed", label=name, colors=color)
            else:
                ax.plot(*zip(*values, strict=True), marker="o", label=name, color=color)
        ax.set(title=title, xlabel=x, xlim=span)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4) or 1,
               frameon=False, bbox_to_anchor=(0.5, -0.08))
    return _save(fig, path)


def plot_keep_ratio_sweep(cells: list[dict[str, Any]], path: Path) -> Path | None:
    """An experiment's measures against keep ratio, one line per method; a method measured at
    keep ratio 1 only (all data, the oracle, the base model) is a dashed horizontal line.
    None when the grid has a single keep ratio."""
    ok = [c for c in cells if c.get("status") == "ok"]
    ratios: dict[str, set[float]] = {}
    for cell in ok:
        ratios.setdefault(str(cell["method"]), set()).add(float(cell["keep_ratio"]))
    flat = tuple(m for m, seen in ratios.items() if seen == {1.0})
    if len({r for m, seen in ratios.items() if m not in flat for r in seen}) < 2:
        return None  # one keep ratio: no sweep to draw (the trade-off plot shows the points)
    panels = {key: title for key, title in (
        ("safety_refusal_rate", "Refusal on harmful prompts (%)"),
        ("heldout_refusal_rate", "Refusal on held-out harmful questions (%)"),
        ("task_accuracy", "Task accuracy (%)"))
        if any(c.get(key) not in (None, "") for c in ok)}
    if not panels:
        return None
    return plot_sweep(ok, "keep_ratio", panels, "method", path, flat, colour=method_colour)


def _group_means(rows: list[dict[str, Any]], x: str, keys: list[str],
                 group: str) -> dict[str, dict[float, dict[str, float]]]:
    """group -> x -> key -> mean of the rows' numeric values (missing / NaN left out)."""
    collected: dict[str, dict[float, dict[str, list[float]]]] = {}
    for row in rows:
        for key in keys:
            value = row.get(key)
            if value in (None, "") or math.isnan(float(value)):
                continue
            point = collected.setdefault(str(row[group]), {}).setdefault(float(row[x]), {})
            point.setdefault(key, []).append(float(value))
    return {name: {px: {k: sum(v) / len(v) for k, v in values.items()}
                   for px, values in points.items()} for name, points in collected.items()}


@dataclass
class Section:
    title: str
    text: str = ""
    table: tuple[list[str], list[list[str]]] | None = None
    images: list[Path] = field(default_factory=list)


def _judge_notes(runs: list[EvalRun]) -> str:
    judges = sorted({r.summary.get("harm_judge") for r in runs if r.summary.get("harm_judge")})
    text = ("Refusal: keyword judge (refusal phrases in the first characters of a response). "
            "Harmfulness: ")
    if any(str(j).startswith("keyword") for j in judges):
        text += ("with the keyword judge, a response to a harmful prompt that does not refuse "
                 "counts as harmful (an upper bound). ")
    text += "Judges used: " + (", ".join(f"`{j}`" for j in judges) or "—") + "."
    return text


def build_sections(evals: list[EvalRun], selections: list[SelectionRun],
                   others: list[OtherRun], out: Path,
                   experiments: list[ExperimentRun] | None = None) -> list[Section]:
    sections = []
    for run in experiments or []:
        sections.append(experiment_section(run, out, f"Experiment {run.path.name}",
                                           f"_{_slug(run.path.name)}"))
    if evals:
        sections.append(Section("Methods × metrics", _judge_notes(evals), methods_table(evals)))
        scatter = plot_safety_vs_helpfulness(evals, out)
        bars = plot_refusal_by_set(evals, out)
        per_set = Section("Refusal rate per prompt set", table=per_set_table(evals))
        per_set.images = [p for p in (bars,) if p]
        sections.append(per_set)
        if scatter:
            sections.append(Section("Safety vs. helpfulness",
                                    f"x axis: {scatter[1]}.", images=[scatter[0]]))
    if selections:
        sel = Section("Data selection", table=selection_table(selections))
        notes = [f"{r.label}: {r.flag_note}" for r in selections if r.flag_note]
        sel.text = "\n\n".join(notes)
        kept = plot_kept_by_flag(selections, out)
        sel.images = [p for p in [kept] + [plot_weight_histogram(r, out) for r in selections]
                      if p]
        sections.append(sel)
    if others:
        sections.append(Section("Other runs", table=other_table(others)))
    return sections


def render_markdown(title: str, sections: list[Section], out: Path) -> str:
    parts = [f"# {title}", ""]
    for s in sections:
        parts += [f"## {s.title}", ""]
        if s.text:
            parts += [s.text, ""]
        if s.table:
            parts += [md_table(*s.table), ""]
        parts += [f"![{p.stem}]({p.relative_to(out).as_posix()})\n" for p in s.images]
    return "\n".join(parts).rstrip() + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid
#ccc;padding:4px 10px;text-align:right}th:first-child,td:first-child{text-align:left}
th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}img{max-width:100%;
margin:0.5em 0;border:1px solid #eee}p{max-width:70em}"""


def render_html(title: str, sections: list[Section]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for s in sections:
        body.append(f"<h2>{html.escape(s.title)}</h2>")
        body += [f"<p>{html.escape(part)}</p>" for part in s.text.split("\n\n") if part]
        if s.table:
            body.append(html_table(*s.table))
        for image in s.images:  # embedded, so the HTML file can be sent on its own
            data = base64.b64encode(image.read_bytes()).decode("ascii")
            body.append(f'<img alt="{html.escape(image.stem)}" '
                        f'src="data:image/png;base64,{data}">')
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")


def report(args: ReportArgs) -> Path:
    """Build the report; returns the path of report.md (report.html is beside it)."""
    found = discover(args.runs)
    labels = list(args.labels)
    evals: list[EvalRun] = []
    selections: list[SelectionRun] = []
    others: list[OtherRun] = []
    experiments: list[ExperimentRun] = []
    for kind, path in found:
        if kind == "experiment":
            experiments.append(load_experiment(path))
        elif kind == "evaluate":
            evals.append(load_eval(path, labels.pop(0) if labels else None))
        elif kind == "selection":
            selections.append(load_selection(path, args.label_field))
        else:
            others.append(OtherRun(path, path.name, _read_json(path / "summary.json")))
    cfg.require(not labels, "labels", "more labels than evaluation runs")
    _dedupe_labels(evals)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections = build_sections(evals, selections, others, out, experiments)
    with atomic_write(out / "report.md") as handle:
        handle.write(render_markdown(args.title, sections, out))
    with atomic_write(out / "report.html") as handle:
        handle.write(render_html(args.title, sections))
    plots = sum(len(section.images) for section in sections)
    print(f"sealft report: {len(experiments)} experiment, {len(evals)} evaluation, "
          f"{len(selections)} selection and {len(others)} other run(s) -> "
          f"{out / 'report.md'}, report.html and {plots} plot(s)",
          file=sys.stderr)
    return out / "report.md"


def _dedupe_labels(runs: list[EvalRun]) -> None:
    # Two runs of the same model would share a label and overlap in the legends.
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.label] = seen.get(run.label, 0) + 1
    for run in runs:
        if seen[run.label] > 1:
            run.label = f"{run.label} ({run.path.name})"
