"""Stage arguments: one dataclass per stage, documented field by field, loaded from YAML plus
`--flag value` options and `key=value` overrides (later wins: defaults < YAML < flags < key=value).

The CLI is derived from the dataclasses: a field's docstring (the string literal under it) is
its `--help` text, so documentation and options cannot drift apart. argparse is used rather than
a CLI framework because the `key=value` override syntax users know from Hydra/litgpt is a few
lines on top of it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import inspect
import json
import re
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from sealft.errors import ConfigError


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under dataclass fields (and inherited ones)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, following in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(scalar type, is_sequence) for the annotations stage dataclasses use."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin in (tuple, list):
        return typing.get_args(annotation)[0], True
    if origin is typing.Literal:
        return type(typing.get_args(annotation)[0]), False
    return annotation, False


def _listed_text(raw: str) -> list[str]:
    """`a,b` or YAML's `[a, b]`: a user who copies a list from the config file onto the command
    line (`seeds=[0,1]`) means the same list."""
    text = raw.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return [item.strip().strip("'\"") for item in text.split(",")]


def _convert(cls: type, name: str, raw: Any) -> Any:
    hints = typing.get_type_hints(cls)
    kind, is_seq = _base_type(hints[name])
    if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null")):
        return None
    try:
        if is_seq:
            items = _listed_text(raw) if isinstance(raw, str) else list(raw)
            return tuple(kind(item.strip() if isinstance(item, str) else item) for item in items)
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(
            f"--{name.replace('_', '-')}: cannot read {raw!r} as {kind.__name__}"
        ) from None


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None
        )
        kind, _ = _base_type(hints[field.name])
        help_text = docs.get(field.name, "")
        help_text += f" (default: {default!r})" if default not in (None, "") else ""
        help_text = help_text.replace("%", "%%")  # argparse %-formats help strings
        flag = "--" + field.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, default=argparse.SUPPRESS, help=help_text,
                                metavar=field.name.upper())
    for old, new in aliases_of(cls).items():
        new_kind, _ = _base_type(hints[new])
        action = argparse.BooleanOptionalAction if new_kind is bool else "store"
        parser.add_argument("--" + old.replace("_", "-"), action=action, dest=old,
                            default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config {path}: cannot read it ({err}); pass a YAML file") from None
    except yaml.YAMLError as err:
        one_line = " ".join(str(err).split())
        raise ConfigError(f"--config {path}: invalid YAML: {one_line}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option: value")
    return data


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. keep_ratio=0.9)")
        out[key.strip().lstrip("-").replace("-", "_")] = value
    return out


def build(cls: type, *layers: dict[str, Any]):
    """Instantiate `cls` from layered option dicts; unknown keys are an error naming them."""
    names = {f.name for f in dataclasses.fields(cls)}
    aliases = aliases_of(cls)
    values: dict[str, Any] = {}
    for layer in layers:
        for key, raw in layer.items():
            key = key.replace("-", "_")
            if key in aliases:
                key = _deprecated(key, aliases[key])
            head, dot, sub = key.partition(".")
            if dot and head in names:  # select.keep_ratio=0.9 sets one entry of a mapping field
                values[head] = _merge(values.get(head), _nested(sub, raw))
                continue
            if key not in names:
                close = [n for n in names if key in n or n in key]
                hint = f"; did you mean {', '.join(sorted(close))}?" if close else ""
                raise ConfigError(f"unknown option {key!r} for {cls.__name__}{hint}")
            converted = _convert(cls, key, raw)
            values[key] = _merge(values.get(key), converted)
    try:
        return cls(**values)
    except TypeError as err:
        raise ConfigError(f"{cls.__name__}: {err}") from None


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    """`a.b.c`, v -> {a: {b: {c: v}}}: dotted overrides reach into nested option mappings."""
    head, dot, rest = dotted.partition(".")
    return {head: _nested(rest, value) if dot else value}


def _merge(old: Any, new: Any) -> Any:
    """A later layer's mapping updates an earlier one key by key (recursively); else replaces."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return new
    merged = dict(old)
    for key, value in new.items():
        merged[key] = _merge(merged.get(key), value)
    return merged


def from_namespace(cls: type, namespace: argparse.Namespace):
    """Merge `--config` YAML, explicit flags and `key=value` overrides into a `cls`."""
    given = vars(namespace)
    yaml_layer = load_yaml(given["config"]) if given.get("config") else {}
    names = {f.name for f in dataclasses.fields(cls)} | set(aliases_of(cls))
    flag_layer = {k: v for k, v in given.items() if k in names}
    override_layer = {key: _mapping_leaf(key, value, names)
                      for key, value in parse_overrides(given.get("overrides") or []).items()}
    return build(cls, yaml_layer, flag_layer, override_layer)


def _mapping_leaf(key: str, value: str, names: set[str]) -> Any:
    """A dotted override's value, read as the same text would be read in the YAML file.

    A top-level option is converted by its field's type; an entry of a mapping option
    (`method_select.seal.neighbour_weight=0.5`) has no type here, and left a string it would be
    saved as '0.5' and refuse a resume whose YAML gives the number 0.5.
    """
    head, dot, _ = key.partition(".")  # parse_overrides already wrote - as _
    if not (dot and head in names):
        return value
    try:
        parsed = yaml.safe_load(value) if value.strip() else value
    except yaml.YAMLError:
        return value
    if isinstance(parsed, (dict, list)):  # `prompt=a: b` is text, not a mapping
        return value
    # YAML 1.1 reads 1e-4 (no dot) as text; a user means the number
    if isinstance(parsed, str) and _EXPONENT_NUMBER.fullmatch(parsed):
        return float(parsed)
    return parsed


_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def to_dict(args: Any) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    return {f.name: plain(getattr(args, f.name)) for f in dataclasses.fields(args)}


def require(condition: bool, flag: str, message: str) -> None:
    """Validation helper for `__post_init__`: the error names the flag users typed."""
    if not condition:
        raise ConfigError(f"--{flag.replace('_', '-')}: {message}")


def require_positive(args: Any, *names: str) -> None:
    """Each named option, when set (not None), must be a positive number (counts, limits and
    learning rates: a negative `--limit` must not quietly mean "all but the last N")."""
    for name in names:
        value = getattr(args, name)
        require(value is None or (value > 0 and value != float("inf")), name,
                f"must be a positive number, got {value}")


# Old option names that still work: a one-line note on stderr says which name to use instead.
# Keyed by dataclass name so that subclasses (and stages defined elsewhere) inherit them.
ALIASES: dict[str, dict[str, str]] = {
    "ReportArgs": {"output": "output_dir", "flag_field": "label_field"},
    "EvaluateArgs": {"progress": "show_progress", "limit": "sample",
                     "suite_limits": "suite_samples"},
    "SelectArgs": {"safe_limit": "safe_sample"},
    "DemoArgs": {"safe_limit": "safe_sample"},
}


def aliases_of(cls: type) -> dict[str, str]:
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        out.update(ALIASES.get(klass.__name__, {}))
    names = {f.name for f in dataclasses.fields(cls)}
    return {old: new for old, new in out.items() if new in names and old not in names}


_WARNED: set[str] = set()


def _deprecated(old: str, new: str) -> str:
    if old not in _WARNED:  # once per process: a config file and a flag may both use it
        _WARNED.add(old)
        print(f"sealft: note: option {old} is deprecated; use {new} "
              f"(--{new.replace('_', '-')})", file=sys.stderr)
    return new


# ---------------------------------------------------------------------------------------------
# Checked resumes: a run dir's settings and data fingerprint must match the resuming command's
# ---------------------------------------------------------------------------------------------

# Options that cannot change what a run computes: they may differ between a run and its resume.
# Data paths are here because the data itself is compared (by fingerprint), so a moved file
# still resumes.
RESULT_NEUTRAL = frozenset({
    "output_dir", "resume", "overwrite", "show_progress", "progress", "save_every", "num_proc",
    "debug", "config", "trust_remote_code", "gradient_checkpointing", "finetune_data",
    "safe_data", "data", "threads", "device", "label", "title", "llm_workers", "llm_timeout",
})


def setting_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'name: old -> new' for every result-changing option that differs."""
    def same(a: Any, b: Any) -> bool:
        as_list = (list, tuple)
        return list(a) == list(b) if isinstance(a, as_list) and isinstance(b, as_list) else a == b

    keys = sorted((set(old) | set(new)) - RESULT_NEUTRAL)
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in keys
            if not same(old.get(key), new.get(key))]


def check_resume_settings(out: Path, args: Any) -> None:
    """Before a resumed run rewrites config.yaml: refuse when a result-changing option differs
    from the run's saved config, listing every difference."""
    saved = out / "config.yaml"
    if not saved.exists():
        return
    renamed = aliases_of(type(args))  # a config saved before an option was renamed
    old = {renamed.get(key, key): value for key, value in load_yaml(saved).items()}
    differences = setting_differences(old, to_dict(args))
    if differences:
        raise ConfigError(
            f"--resume: {out} was started with other settings ({'; '.join(differences)}); "
            "rerun with the original settings, or start a new --output-dir"
        )


def data_fingerprint(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Row count and a hash of the ids and messages: which rows, in which order, with what text."""
    digest = hashlib.sha1()
    raw_rows = getattr(examples, "raw_rows", None)
    if raw_rows is not None:  # data.Examples: the stored JSON text is what json.dumps gives
        for ex_id, messages in raw_rows("id", "messages"):
            digest.update(str(ex_id).encode())
            digest.update(messages.encode())
        return {"rows": len(examples), "sha1": digest.hexdigest()[:16]}
    for example in examples:
        item = example if isinstance(example, dict) else example[0]  # (chosen, rejected) pairs
        digest.update(str(item["id"]).encode())
        digest.update(json.dumps(item["messages"], ensure_ascii=False).encode())
    return {"rows": len(examples), "sha1": digest.hexdigest()[:16]}


def check_resume_data(out: Path, data: dict[str, list], resume: bool) -> None:
    """Save the data fingerprints of a new run; on --resume, refuse other data."""
    from sealft.io import manifest_value, read_manifest

    now = {name: data_fingerprint(rows) for name, rows in data.items()}
    # Read from disk, not from this process's records, so that every process of a launch
    # reaches the same verdict (only the main process writes the manifest).
    saved = (read_manifest(out) or {}).get("data") or {}
    if resume and saved:
        changed = [f"{name}: {saved[name]['rows']} rows -> {now[name]['rows']} rows"
                   + (" (same count, different rows or text)"
                      if saved[name]["rows"] == now[name]["rows"] else "")
                   for name in now if name in saved and saved[name] != now[name]]
        if changed:
            raise ConfigError(
                f"--resume: {out} was started on other data ({'; '.join(changed)}); resume "
                "with the original data (and --limit/--sample), or start a new --output-dir"
            )
    manifest_value(out, "data", {**saved, **now})


@dataclasses.dataclass
class RunOptions:
    """Options every training stage shares (selection and fine-tuning)."""

    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA alpha."""
    lora_dropout: float = 0.0
    """LoRA dropout."""
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    """Modules that get LoRA adapters (comma-separated)."""
    seed: int = 0
    """Seed for data order, sampling and initialisation."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at epoch ends)."""
    resume: bool = False
    """Continue from the checkpoint in output_dir."""
    overwrite: bool = False
    """Replace a non-empty output_dir."""
    dtype: str = "float32"
    """Model weights dtype: float32 | bfloat16 | float16 | auto."""
    chat_template: str | None = None
    """Jinja chat template (file or string) for tokenizers without one."""
    trust_remote_code: bool = False
    """Allow model repos to run their own code (off unless you trust the repo)."""
    num_proc: int | None = None
    """Processes for tokenisation (datasets.map)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward instead of storing them: activation memory, which
    grows with micro-batch × length and dominates for long sequences, for ~one more forward."""
    show_progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        require(self.lora_r > 0, "lora_r", "must be positive")
        require(self.lora_alpha > 0, "lora_alpha", "must be positive")
        require(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
        require(self.num_proc is None or self.num_proc > 0, "num_proc", "must be positive")
        require(self.dtype in ("float32", "bfloat16", "float16", "auto"), "dtype",
                "use float32, bfloat16, float16 or auto")
        require(bool(self.lora_target_modules), "lora_target_modules",
                "name at least one module (e.g. q_proj,v_proj)")
        require(self.save_every >= 0, "save_every", "must be >= 0")
        require(not (self.resume and self.overwrite), "resume",
                "--resume and --overwrite exclude each other")


# Options naming files or folders a run reads: --overwrite must never delete one of them.
INPUT_FIELDS = ("model", "finetune_data", "safe_data", "data", "weights_from", "chat_template",
                "adapter", "helpfulness_reference", "selection")


def input_paths(args: Any) -> list[str]:
    return [value for name in INPUT_FIELDS
            if isinstance(value := getattr(args, name, None), str) and value]


def start_run(args: Any, stage: str) -> Path:
    """Prepare `args.output_dir` for a stage: check a resume's settings, create or reuse the
    dir (see `io.prepare_output_dir`), then record the resolved options in config.yaml, only
    now, so that a refused resume leaves the old config in place."""
    from sealft.io import prepare_output_dir, record_output, require_stage, write_yaml

    out = Path(args.output_dir)
    if args.resume and out.is_dir():
        require_stage(out, stage, "--resume")
        check_resume_settings(out, args)
    prepare_output_dir(out, args.overwrite, args.resume, stage, input_paths(args))
    record_output(out, "logs")  # Accelerate's project dir, written without sealft's helpers
    write_yaml(out / "config.yaml", to_dict(args))
    return out
