"""`sealft` command line: one subcommand per stage, options derived from the stage dataclasses.

    sealft select   --model M --finetune-data F --safe-data S --output-dir OUT [key=value ...]
    sealft finetune --model M --data OUT/selected.jsonl --output-dir FT
    sealft run      --config run.yaml          (select, then fine-tune on the selection)
    sealft evaluate --model M --adapter FT/adapter --suite safety --output-dir EVAL
    sealft report   EVAL1 EVAL2 ... --output-dir report/
    sealft demo     (real offline model, real data, a few minutes on a laptop CPU)

Errors users can fix are printed as one line and exit with code 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sealft import __version__
from sealft import config as cfg
from sealft.errors import SealftError
from sealft.io import read_jsonl, undo_failed_starts, untrack_all


@dataclass(frozen=True)
class Stage:
    """A subcommand: where its arguments dataclass and run function live, imported on use so
    `sealft --help` does not pay for torch / transformers."""

    module: str
    args_class: str
    run: str
    help: str

    def load(self) -> tuple[type, Callable[[Any], Any]]:
        module = importlib.import_module(self.module)
        return getattr(module, self.args_class), getattr(module, self.run)


COMMANDS: dict[str, Stage] = {
    "select": Stage("sealft.select", "SelectArgs", "run_select",
                    "learn per-example weights (SEAL or a baseline) and keep the top p%"),
    "score": Stage("sealft.score", "ScoreArgs", "run_score",
                   "score new rows with a finished selection run's scorer (forward passes)"),
    "finetune": Stage("sealft.finetune", "FinetuneArgs", "run_finetune",
                      "LoRA fine-tuning on (selected) data"),
    "run": Stage("sealft.pipeline", "RunArgs", "run_pipeline",
                 "select, then fine-tune on the selection"),
    "evaluate": Stage("sealft.evaluate", "EvaluateArgs", "evaluate",
                      "safety / over-refusal / task / helpfulness evaluation"),
    "report": Stage("sealft.report", "ReportArgs", "report",
                    "tables and plots comparing evaluation and selection runs"),
    "experiment": Stage("sealft.experiment", "ExperimentArgs", "run_experiment",
                        "selectors × keep ratios × seeds: select, fine-tune, evaluate, tabulate"),
    "demo": Stage("sealft.demo", "DemoArgs", "run_demo",
                  "SEAL on a real offline model and real data, in minutes on a CPU"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (with where to get help), like every other
    error a user can fix; the full usage stays in --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="sealft", description="Safety-enhanced LLM fine-tuning by bilevel data selection.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"sealft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, spec in COMMANDS.items():
        # argparse %-formats help strings; "top p%" must reach it as "top p%%".
        stage = sub.add_parser(name, help=spec.help.replace("%", "%%"), description=spec.help)
        stage.add_argument("--config", help="YAML file of options (flags and key=value win)")
        # SUPPRESS: without it the subcommand's default (False) would undo `sealft --debug CMD`.
        stage.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                           help="show tracebacks on errors")
        stage.add_argument(
            "overrides", nargs="*", metavar="key=value",
            help="option overrides, e.g. keep_ratio=0.9"
            + ("; other positional arguments are run dirs" if name == "report" else ""),
        )
        if command == name:  # import only the stage being run: keeps `sealft --help` fast
            cfg.add_arguments(stage, spec.load()[0])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The libraries' notes about their own future API changes are not for sealft's users, who
    # can do nothing about them; they would only bury sealft's one-line messages.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers|peft|accelerate")
    command = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(command)
    quiet = False
    try:
        namespace = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version and usage errors: no stage to run
        return done.code if isinstance(done.code, int) else 0
    if namespace.command is None:
        parser.print_help()
        return 2
    try:
        args_class, run = COMMANDS[namespace.command].load()
        if namespace.command == "report":
            positional = [o for o in namespace.overrides if "=" not in o]
            namespace.overrides = [o for o in namespace.overrides if "=" in o]
            if positional:
                namespace.overrides.append("runs=" + ",".join(positional))
        args = cfg.from_namespace(args_class, namespace)
        started = time.perf_counter()
        quiet = quiet_library_progress(args)
        result = run(args)
        if namespace.command in SUMMARISED and isinstance(result, dict) and result:
            print_summary(namespace.command, args, result, time.perf_counter() - started)
        return result if isinstance(result, int) else 0
    except (SealftError, OSError) as err:
        # OSError here is the environment (a read-only or full disk, a path that is a file):
        # the user can fix it, so it gets the same one line as a bad option.
        undo_failed_starts()
        if namespace.debug:
            traceback.print_exc()
        message = str(err) if isinstance(err, SealftError) else os_error_line(err)
        one_line = " ".join(part.strip() for part in message.splitlines() if part.strip())
        print(f"sealft {namespace.command}: error: {one_line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        undo_failed_starts()
        print(f"sealft {namespace.command}: interrupted; rerun with --resume to continue",
              file=sys.stderr)
        return 130
    except BaseException:
        undo_failed_starts()  # a bug is no reason to leave a half-started dir behind
        raise
    finally:
        untrack_all()
        if quiet:
            quiet_library_progress(None, enable=True)
        close_process_group()


def quiet_library_progress(args: Any, enable: bool = False) -> bool:
    """--no-show-progress also silences the bars of transformers (weight loading) and datasets
    (map): a user who turned bars off wants none. Returns whether it switched them off."""
    wanted = [getattr(args, "show_progress", True)]
    for stage in ("select", "finetune"):
        options = getattr(args, stage, None)
        if isinstance(options, dict):
            wanted.append(options.get("show_progress", True) not in (False, "false", "False"))
    if not enable and all(wanted):
        return False
    import datasets
    from transformers.utils import logging as hf_logging

    if enable:
        datasets.enable_progress_bars()
        hf_logging.enable_progress_bar()
    else:
        datasets.disable_progress_bars()
        hf_logging.disable_progress_bar()
    return True


def os_error_line(err: OSError) -> str:
    where = f"{err.filename}: " if err.filename else ""
    reason = err.strerror or str(err)
    if err.errno == errno.ENOSPC:
        return f"{where}{reason}; free some space or choose another --output-dir"
    return f"{where}{reason}; check the path and its permissions"


SUMMARISED = ("select", "score", "finetune", "run")


def print_summary(command: str, args: Any, summary: dict[str, Any], seconds: float) -> None:
    """A few lines on stderr at the end of select / score / finetune / run: what was read, used,
    skipped (and why), kept, where the outputs are, and what it cost."""
    if os.environ.get("RANK", "0") != "0":  # one summary per launch, not one per process
        return
    out = Path(args.output_dir)
    stages = ([("select", summary.get("select", {}), out / "select"),
               ("finetune", summary.get("finetune", {}), out / "finetune")]
              if command == "run" else [(command, summary, out)])
    for name, stage, folder in stages:
        print(f"sealft {name}: " + _counts_line(stage, folder), file=sys.stderr)
        reasons = _skip_reasons(stage, folder)
        if reasons:
            print(f"  skipped: {reasons}", file=sys.stderr)
        outputs = [str(folder / n) for n in ("selected.jsonl", "scores.jsonl", "adapter",
                                              "merged", "summary.json") if (folder / n).exists()]
        print(f"  outputs: {', '.join(outputs)}", file=sys.stderr)
    peak = max(s.get("peak_memory_mb", 0.0) for _, s, _ in stages)
    print(f"  wall time {seconds:.1f} s, peak memory {peak:.0f} MB", file=sys.stderr)


def _counts_line(stage: dict[str, Any], folder: Path) -> str:
    skipped = stage.get("skipped", 0)
    skipped = len(skipped) if isinstance(skipped, dict) else skipped
    parts = [f"{stage.get('rows', '?')} rows read", f"{stage.get('usable', '?')} used",
             f"{skipped} skipped"]
    if "kept" in stage:
        parts.append(f"{stage['kept']} kept")
    if stage.get("truncated"):
        parts.append(f"{stage['truncated']} truncated")
    if "steps" in stage:
        parts.append(f"{stage['steps']} step{'s' if stage['steps'] != 1 else ''}")
    labels = stage.get("labels")
    if labels and labels.get("unsafe_rows"):
        parts.append(f"{labels['unsafe_removed']} of {labels['unsafe_rows']} rows flagged "
                     f"unsafe in {labels['field']!r} removed")
    return ", ".join(parts)


def _skip_reasons(stage: dict[str, Any], folder: Path, top: int = 3) -> str:
    """The commonest reasons rows were skipped, with counts."""
    skipped = stage.get("skipped")
    if isinstance(skipped, dict):
        reasons = list(skipped.values())
    elif skipped and (folder / "scores.jsonl").exists():
        reasons = [r["skipped"] for r in read_jsonl(folder / "scores.jsonl") if "skipped" in r]
    else:
        return ""
    common = Counter(reasons).most_common(top)
    more = len(set(reasons)) - len(common)
    return "; ".join(f"{n} × {reason}" for reason, n in common) + (
        f"; {more} other reason(s)" if more > 0 else "")


def close_process_group() -> None:
    # torchrun / accelerate launch leave a process group that nothing else closes. Left to
    # interpreter teardown, gloo's threads occasionally abort a finished run ("terminate called
    # without an active exception", exit -6), so close it while the interpreter is intact.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
