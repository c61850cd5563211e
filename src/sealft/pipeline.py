"""`sealft run`: select, then fine-tune on the selection, in one run directory.

A run config has a `select:` and a `finetune:` section (each the options of that stage); keys
at the top level (e.g. `model`, `output_dir`) apply to both stages where they exist.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sealft import config as cfg
from sealft.data import require_source
from sealft.finetune import FinetuneArgs, run_finetune
from sealft.io import prepare_output_dir, write_json
from sealft.select import SelectArgs, run_select


@dataclass
class RunArgs:
    output_dir: str = ""
    """Run directory: selection goes to OUTPUT_DIR/select, fine-tuning to OUTPUT_DIR/finetune."""
    model: str | None = None
    """Model for both stages (a stage's own `model` wins)."""
    select: dict[str, Any] = field(default_factory=dict)
    """Options of `sealft select` (YAML mapping; or key=value as select.KEY=VALUE)."""
    finetune: dict[str, Any] = field(default_factory=dict)
    """Options of `sealft finetune` (data defaults to the selection's selected.jsonl)."""
    weighted: bool = False
    """Weight the fine-tuning loss by the learned weights."""
    overwrite: bool = False
    """Replace a non-empty output_dir."""
    resume: bool = False
    """Resume both stages (a finished selection is not redone)."""

    def __post_init__(self) -> None:
        cfg.require(bool(self.output_dir), "output_dir", "required")
        cfg.require(isinstance(self.select, dict), "select", "must be a mapping of options")
        cfg.require(isinstance(self.finetune, dict), "finetune", "must be a mapping of options")


def stage_args(args: RunArgs) -> tuple[SelectArgs, FinetuneArgs]:
    out = Path(args.output_dir)
    shared = {"model": args.model} if args.model else {}
    select = cfg.build(SelectArgs, shared, args.select,
                       {"output_dir": str(out / "select"), "resume": args.resume,
                        "overwrite": False})
    finetune_defaults = {"data": str(out / "select" / "selected.jsonl"),
                         "max_length": select.max_length, "seed": select.seed,
                         "lora_r": select.lora_r, "lora_alpha": select.lora_alpha,
                         "lora_target_modules": select.lora_target_modules}
    if args.weighted:
        finetune_defaults["weights_from"] = str(out / "select" / "scores.jsonl")
    finetune = cfg.build(FinetuneArgs, {"model": select.model}, finetune_defaults,
                         args.finetune, {"output_dir": str(out / "finetune"),
                                         "resume": args.resume, "overwrite": False})
    return select, finetune


def run_pipeline(args: RunArgs) -> dict:
    select, finetune = stage_args(args)  # validate both stages before any work
    # The fine-tuning data defaults to this run's own selection: only user-given paths are
    # inputs that --overwrite must not delete.
    own = {str(Path(args.output_dir) / "select" / name) for name in ("selected.jsonl",
                                                                     "scores.jsonl")}
    inputs = cfg.input_paths(select) + [p for p in cfg.input_paths(finetune) if p not in own]
    if finetune.data not in own:  # user-given: checked before the selection's compute
        require_source(finetune.data, "finetune.data")
    out = prepare_output_dir(args.output_dir, args.overwrite, args.resume, "run", inputs)
    done = (out / "select" / "summary.json").exists()
    if done:  # a finished stage is reused, not rerun: it must have been run with these settings
        cfg.check_resume_settings(out / "select", select)
    select_summary = (cfg.load_yaml(out / "select" / "summary.json") if done
                      else run_select(select))
    if done:
        print(f"selection already finished in {out / 'select'}; fine-tuning")
    if args.resume and (out / "finetune" / "summary.json").exists():
        cfg.check_resume_settings(out / "finetune", finetune)
        finetune_summary = cfg.load_yaml(out / "finetune" / "summary.json")
    else:
        finetune_summary = run_finetune(dataclasses.replace(
            finetune, resume=args.resume and (out / "finetune").exists()))
    summary = {"select": select_summary, "finetune": finetune_summary}
    write_json(out / "summary.json", summary)
    return summary
