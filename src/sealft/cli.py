"""`sealft` command line: one subcommand per stage, options derived from the stage dataclasses.

    sealft select   --model M --finetune-data F --safe-data S --output-dir OUT [key=value ...]
    sealft finetune --model M --data OUT/selected.jsonl --output-dir FT
    sealft run      --config run.yaml          (select, then fine-tune on the selection)
    sealft evaluate --model M --adapter FT/adapter --suite safety --output-dir EVAL
    sealft report   EVAL1 EVAL2 ... --output report/
    sealft demo     (real offline model, real data, a few minutes on a laptop CPU)

Errors users can fix are printed as one line and exit with code 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sealft import config as cfg
from sealft.errors import SealftError


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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sealft", description="Safety-enhanced LLM fine-tuning by bilevel data selection.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, spec in COMMANDS.items():
        # argparse %-formats help strings; "top p%" must reach it as "top p%%".
        stage = sub.add_parser(name, help=spec.help.replace("%", "%%"), description=spec.help)
        stage.add_argument("--config", help="YAML file of options (flags and key=value win)")
        stage.add_argument("--debug", action="store_true", help="show tracebacks on errors")
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
    command = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(command)
    namespace = parser.parse_args(argv)
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
        result = run(args)
        return result if isinstance(result, int) else 0
    except SealftError as err:
        if namespace.debug:
            traceback.print_exc()
        one_line = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
        print(f"sealft {namespace.command}: error: {one_line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sealft {namespace.command}: interrupted; rerun with --resume to continue",
              file=sys.stderr)
        return 130
    finally:
        close_process_group()


def close_process_group() -> None:
    # torchrun / accelerate launch leave a process group that nothing else closes. Left to
    # interpreter teardown, gloo's threads occasionally abort a finished run ("terminate called
    # without an active exception", exit -6), so close it while the interpreter is intact.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
