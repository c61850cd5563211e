"""Evaluation suites: named groups of prompt sets, each set read from a public data file.

A suite is a function from a `SuiteContext` to prompt sets; `register_suite` adds one. Each set
has a `kind` that tells the scorer what a good answer is:

  harmful   refusing is right      -> refusal rate, harmfulness rate
  benign    refusing is wrong      -> over-refusal rate
  task      SST-2 style labels     -> accuracy (with parse failures)
  pairwise  reference answers      -> win rate against the reference

Default files live under the shared data folder (see `resolve_data_dir`); any file can be
swapped with `data_paths` ("SET=PATH"), and any prompt file (txt: one per line; csv: a column;
json/jsonl: a field) becomes a suite of its own.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sealft.errors import ConfigError, DataError

KINDS = ("harmful", "benign", "task", "pairwise")

# Relative to the data dir. A glob pattern reads and concatenates every matching file.
DEFAULT_FILES: dict[str, str] = {
    "advbench": "eval/advbench_harmful_behaviors.csv",
    "harmbench": "eval/harmbench_prompts.txt",
    "malicious_instructions": "eval/safetyllamas/safetyllamas_I-MaliciousInstructions.json",
    "cona": "eval/safetyllamas/safetyllamas_I-CoNa.json",
    "controversial": "eval/safetyllamas/safetyllamas_I-Controversial.json",
    "q_harm": "eval/safetyllamas/safetyllamas_Q-Harm.json",
    "physical_unsafe": "eval/safetyllamas/safetyllamas_I-PhysicalSafetyUnsafe.json",
    "donotanswer": "eval/donotanswer/*.jsonl",
    "xstest": "eval/xstest_prompts.csv",
    "sst2": "eval/sst2_val.json",
    "alpaca_eval": "benign/alpaca_eval_gpt4_outputs.json",
}
SAFETY_SETS = ("advbench", "harmbench", "malicious_instructions", "cona", "controversial",
               "q_harm", "physical_unsafe", "donotanswer")
_PROMPT_FIELDS = ("prompt", "instruction", "instructions", "goal", "question", "query", "text",
                  "behavior", "Behavior")


@dataclass
class PromptSet:
    name: str
    kind: str
    items: list[dict[str, Any]]
    """{"id", "prompt"} plus "label" (task) or "reference" (pairwise)."""
    source: str
    total: int = 0
    """Rows in the source before --limit sampling."""


@dataclass
class SuiteContext:
    data_dir: Path | None = None
    data_paths: dict[str, str] = field(default_factory=dict)
    limit: int | None = None
    suite_limits: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    safety_sets: tuple[str, ...] = SAFETY_SETS
    xstest_include_unsafe: bool = False
    helpfulness_reference: str | None = None
    prompt_files: tuple[str, ...] = ()
    prompt_files_kind: str = "harmful"
    prompt_field: str | None = None

    def limit_for(self, suite: str) -> int | None:
        return self.suite_limits.get(suite, self.limit)

    def path(self, key: str) -> Path:
        """The file for a default set: an override, else under the data dir."""
        if key in self.data_paths:
            return Path(self.data_paths[key]).expanduser()
        if self.data_dir is None:
            raise DataError(
                f"no data folder for the {key!r} prompts: the default shared data was not found "
                f"(looked for {', '.join(str(p) for p in default_data_candidates())}); pass "
                f"--data-dir DIR, set SEALFT_DATA, or --data-paths {key}=FILE"
            )
        return self.data_dir / DEFAULT_FILES[key]


def default_data_candidates() -> list[Path]:
    repo_root = Path(__file__).resolve().parents[3]
    cwd = Path.cwd()
    return [cwd / ".." / "shared" / "data", repo_root / ".." / "shared" / "data",
            cwd / "shared" / "data"]


def resolve_data_dir(explicit: str | None = None) -> Path | None:
    """--data-dir, else $SEALFT_DATA, else ../shared/data next to the cwd or the repo root."""
    chosen = explicit or os.environ.get("SEALFT_DATA")
    if chosen:
        path = Path(chosen).expanduser()
        if not path.is_dir():
            source = "--data-dir" if explicit else "$SEALFT_DATA"
            raise DataError(f"{source} {path}: no such folder")
        return path.resolve()
    for candidate in default_data_candidates():
        if candidate.is_dir():
            return candidate.resolve()
    return None


# ---------------------------------------------------------------------------------------------
# Reading prompt files
# ---------------------------------------------------------------------------------------------


def _pick_field(row: dict[str, Any], field_name: str | None, where: str) -> Any:
    if field_name is not None:
        if field_name not in row:
            raise DataError(f"{where}: no field {field_name!r}; fields: {sorted(row)}")
        return row[field_name]
    for name in _PROMPT_FIELDS:
        if name in row:
            value = row[name]
            extra = row.get("input") if name == "instruction" else None
            return f"{value}\n\n{extra.strip()}" if isinstance(extra, str) and extra.strip() \
                else value
    raise DataError(f"{where}: cannot tell which field holds the prompt (fields: {sorted(row)}); "
                    "name it with --prompt-field or FILE#FIELD")


def _read_csv_prompts(path: Path, field_name: str | None) -> list[str]:
    with open(path, encoding="utf-8", newline="") as handle:
        rows = [r for r in csv.reader(handle) if r and not r[0].startswith("#")]
    if not rows:
        return []
    header = rows[0]
    if field_name is not None:
        if field_name not in header:
            raise DataError(f"{path}: no column {field_name!r} in the header {header}")
        col = header.index(field_name)
        return [r[col] for r in rows[1:] if len(r) > col]
    known = [name for name in _PROMPT_FIELDS if name in header]
    if known:
        col = header.index(known[0])
        return [r[col] for r in rows[1:] if len(r) > col]
    if all(len(r) == 1 for r in rows):  # a headerless list, e.g. AdvBench's behaviours
        return [r[0] for r in rows]
    raise DataError(f"{path}: several columns and none named like a prompt ({header}); "
                    "name it with --prompt-field or FILE#COLUMN")


def read_prompt_file(path: str | Path, field_name: str | None = None) -> list[str]:
    """Prompts from txt (one per line), csv (a column; a one-column file may have no header),
    json (a list of strings/objects, or an object holding one such list) or jsonl."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    elif suffix == ".csv":
        prompts = _read_csv_prompts(path, field_name)
    elif suffix in (".json", ".jsonl"):
        prompts = _read_json_prompts(path, field_name)
    else:
        raise DataError(f"{path}: unsupported prompt file; use .txt, .csv, .json or .jsonl")
    prompts = [str(p).strip() for p in prompts]
    return [p for p in prompts if p]


def _read_json_prompts(path: Path, field_name: str | None) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        try:
            data: Any = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: malformed JSON line ({err.msg})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
    if isinstance(data, dict):
        if field_name and isinstance(data.get(field_name), list):
            return data[field_name]
        lists = [k for k, v in data.items() if isinstance(v, list) and v]
        preferred = [k for k in lists if k in _PROMPT_FIELDS]
        if not (preferred or len(lists) == 1):
            raise DataError(f"{path}: an object with lists {lists}; name one with --prompt-field")
        data = data[(preferred or lists)[0]]
        field_name = None if field_name and field_name in (preferred or lists) else field_name
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of prompts")
    return [row if isinstance(row, str) else _pick_field(row, field_name, f"{path} row {i + 1}")
            for i, row in enumerate(data)]


# ---------------------------------------------------------------------------------------------
# Building sets
# ---------------------------------------------------------------------------------------------


def sample_items(items: list[dict[str, Any]], limit: int | None, seed: int,
                 name: str) -> list[dict[str, Any]]:
    """A seeded subset in source order; seeded by set name too, so sets draw independently and
    the same set draws the same rows in every run (comparable across models)."""
    if limit is None or limit >= len(items):
        return items
    chosen = sorted(random.Random(f"{seed}:{name}").sample(range(len(items)), limit))
    return [items[i] for i in chosen]


def _expand(path: Path) -> list[Path]:
    if any(ch in path.name for ch in "*?["):
        files = sorted(path.parent.glob(path.name))
        if not files:
            raise DataError(f"no files match {path}")
        return files
    if not path.is_file():
        raise DataError(f"evaluation data file {path} does not exist; pass --data-dir or "
                        "--data-paths SET=FILE")
    return [path]


def prompt_set_from_files(name: str, kind: str, path: Path, ctx: SuiteContext, suite: str,
                          field_name: str | None = None) -> PromptSet:
    files = _expand(path)
    items = []
    for file in files:
        prefix = f"{name}:{file.stem}" if len(files) > 1 else name
        items += [{"id": f"{prefix}:{i}", "prompt": p}
                  for i, p in enumerate(read_prompt_file(file, field_name))]
    if not items:
        raise DataError(f"{path}: no prompts found")
    return PromptSet(name, kind, sample_items(items, ctx.limit_for(suite), ctx.seed, name),
                     str(path), len(items))


def safety_suite(ctx: SuiteContext) -> list[PromptSet]:
    unknown = [s for s in ctx.safety_sets if s not in SAFETY_SETS]
    if unknown:
        raise ConfigError(f"--safety-sets: unknown set(s) {unknown}; known: "
                          f"{', '.join(SAFETY_SETS)}")
    return [prompt_set_from_files(s, "harmful", ctx.path(s), ctx, "safety")
            for s in ctx.safety_sets]


def _xstest_rows(ctx: SuiteContext) -> tuple[Path, list[dict[str, str]]]:
    path = ctx.path("xstest")
    if not path.is_file():
        raise DataError(f"XSTest prompts {path} do not exist")
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"prompt", "label"} <= set(rows[0]):
        raise DataError(f"{path}: expected XSTest columns prompt and label (safe/unsafe)")
    return path, rows


def overrefusal_suite(ctx: SuiteContext) -> list[PromptSet]:
    path, rows = _xstest_rows(ctx)
    sets = []
    wanted = [("xstest_safe", "safe", "benign")]
    if ctx.xstest_include_unsafe:
        wanted.append(("xstest_unsafe", "unsafe", "harmful"))
    for name, label, kind in wanted:
        items = [{"id": f"xstest:{r.get('id') or i}", "prompt": r["prompt"],
                  "type": r.get("type")}
                 for i, r in enumerate(rows) if r["label"].strip().lower() == label]
        sets.append(PromptSet(name, kind, sample_items(items, ctx.limit_for("overrefusal"),
                                                       ctx.seed, name), str(path), len(items)))
    return sets


def task_suite(ctx: SuiteContext) -> list[PromptSet]:
    path = ctx.path("sst2")
    if not path.is_file():
        raise DataError(f"SST-2 validation file {path} does not exist")
    rows = json.loads(path.read_text(encoding="utf-8"))
    items = []
    for i, row in enumerate(rows):
        if not {"instruction", "output"} <= set(row):
            raise DataError(f"{path} row {i + 1}: expected instruction, input, output")
        extra = (row.get("input") or "").strip()
        prompt = f"{row['instruction']}\n\n{extra}" if extra else row["instruction"]
        items.append({"id": f"sst2:{i}", "prompt": prompt,
                      "label": str(row["output"]).strip().lower()})
    return [PromptSet("sst2", "task", sample_items(items, ctx.limit_for("task"), ctx.seed,
                                                   "sst2"), str(path), len(items))]


def helpfulness_suite(ctx: SuiteContext) -> list[PromptSet]:
    reference = ctx.helpfulness_reference
    if reference and Path(reference).is_dir():
        return [_reference_from_eval_dir(Path(reference), ctx)]
    path = Path(reference).expanduser() if reference else ctx.path("alpaca_eval")
    if not path.is_file():
        raise DataError(f"helpfulness reference {path} does not exist; pass a JSON/JSONL file "
                        "of {instruction, output} or another evaluation dir")
    from sealft.data import read_rows

    items = []
    for i, row in enumerate(read_rows(str(path))):
        if "instruction" not in row or "output" not in row:
            raise DataError(f"{path} row {i + 1}: expected fields instruction and output")
        items.append({"id": f"alpaca_eval:{i}", "prompt": row["instruction"],
                      "reference": row["output"]})
    return [PromptSet("alpaca_eval", "pairwise", sample_items(
        items, ctx.limit_for("helpfulness"), ctx.seed, "alpaca_eval"), str(path), len(items))]


def _reference_from_eval_dir(folder: Path, ctx: SuiteContext) -> PromptSet:
    """Another run's helpfulness answers as the reference (e.g. all-data SFT, as in the paper)."""
    from sealft.evaluate.generate import GENERATIONS_FILE, read_generations

    cache = read_generations(folder / GENERATIONS_FILE)
    items = [{"id": key[1], "prompt": row["prompt"], "reference": row["response"]}
             for key, row in sorted(cache.items()) if key[0] == "helpfulness"]
    if not items:
        raise DataError(f"--helpfulness-reference {folder}: that evaluation has no helpfulness "
                        "generations; run `sealft evaluate --suite helpfulness` there first")
    name = f"vs_{folder.name}"
    return PromptSet(name, "pairwise", sample_items(items, ctx.limit_for("helpfulness"),
                                                    ctx.seed, "alpaca_eval"), str(folder),
                     len(items))


def parse_prompt_file_spec(spec: str) -> tuple[str, Path, str | None]:
    """'[NAME=]PATH[#FIELD]' -> (name, path, field)."""
    name, sep, rest = spec.partition("=")
    if not sep or "/" in name or not name:
        name, rest = "", spec
    rest, _, field_name = rest.partition("#")
    path = Path(rest).expanduser()
    return name or path.stem, path, field_name or None


def custom_suite(ctx: SuiteContext) -> list[PromptSet]:
    if not ctx.prompt_files:
        raise ConfigError("--suite custom needs --prompt-files [NAME=]FILE[#FIELD]")
    if ctx.prompt_files_kind not in ("harmful", "benign"):
        raise ConfigError("--prompt-files-kind: use harmful (refusal is right) or benign")
    sets = []
    for spec in ctx.prompt_files:
        name, path, field_name = parse_prompt_file_spec(spec)
        sets.append(prompt_set_from_files(name, ctx.prompt_files_kind, path, ctx, "custom",
                                          field_name or ctx.prompt_field))
    return sets


SuiteBuilder = Callable[[SuiteContext], list[PromptSet]]
SUITES: dict[str, tuple[SuiteBuilder, str]] = {}


def register_suite(name: str, builder: SuiteBuilder, description: str = "") -> None:
    """Add a suite; its prompt sets' kinds decide how responses are scored."""
    SUITES[name] = (builder, description)


register_suite("safety", safety_suite, "harmful prompts: refusal and harmfulness rates")
register_suite("overrefusal", overrefusal_suite, "XSTest safe prompts: over-refusal rate")
register_suite("task", task_suite, "SST-2 validation: sentiment accuracy")
register_suite("helpfulness", helpfulness_suite, "AlpacaEval: pairwise win rate vs reference")
register_suite("custom", custom_suite, "your own prompt files (--prompt-files)")
# Nothing to generate: the held-out answers are scored by their loss (evaluate/likelihood.py).
register_suite("task-loss", lambda ctx: [], "held-out answers of your task (--task-data): loss")
ALL = ("safety", "overrefusal", "task", "helpfulness")


def expand_suite_names(spec: str | tuple[str, ...], ctx: SuiteContext) -> list[str]:
    """'all', registered names, or paths of prompt files (each becomes a custom set)."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in (n.strip() for n in names):
        if raw == "all":
            out += list(ALL)
        elif raw in SUITES:
            out.append(raw)
        elif Path(raw.partition("#")[0]).expanduser().is_file():
            ctx.prompt_files = (*ctx.prompt_files, raw)
            out.append("custom")
        else:
            raise ConfigError(f"--suite {raw!r}: unknown; use all, {', '.join(SUITES)} or the "
                              "path of a prompt file")
    if ctx.prompt_files and "custom" not in out:
        out.append("custom")
    return list(dict.fromkeys(out))


def build_suites(names: list[str], ctx: SuiteContext) -> dict[str, list[PromptSet]]:
    """Read every set before any model is loaded, so a missing file fails in seconds."""
    return {name: SUITES[name][0](ctx) for name in names}
