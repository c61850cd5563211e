"""`sealft finetune`: LoRA SFT on (selected) data, optionally weighted by learned weights.

The adapter is saved with PEFT's `save_pretrained` (adapter_config.json + safetensors), the format
PEFT, TRL and vLLM load; `--merge` also writes full merged weights for tools without LoRA support.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from sealft import config as cfg
from sealft.data import ids_at, load_examples, sample_rows
from sealft.errors import DataError
from sealft.io import read_jsonl, record_output, write_json
from sealft.losses import per_example_loss
from sealft.models import adapter_parameters, add_lora_adapters, load_model_and_tokenizer
from sealft.runtime import (
    finish_logging,
    log_metrics,
    lora_settings,
    make_accelerator,
    peak_memory_mb,
    process_state,
    sharding_engine,
)
from sealft.selector import align_scores
from sealft.tokenize import collate, require_usable, tokenize_examples
from sealft.train import LoopSettings, adapter_checkpoint, train_loop

ADAPTER = "default"


@dataclass
class FinetuneArgs(cfg.RunOptions):
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """Causal LM to fine-tune: hub id, local folder or .gguf file."""
    data: str = ""
    """Training data (e.g. a selection run's selected.jsonl), any supported format."""
    output_dir: str = ""
    """Run directory; the adapter goes to OUTPUT_DIR/adapter."""
    weights_from: str | None = None
    """Optional scores.jsonl: weight each example's loss by its learned weight (matched by id)."""
    epochs: int = 2
    """Passes over the data (paper: 2)."""
    batch_size: int = 64
    """Effective batch per step over all processes (paper: 64)."""
    micro_batch_size: int = 8
    """Examples per forward pass; gradients are accumulated up to batch_size."""
    lr: float = 1e-5
    """Adam learning rate (paper: 1e-5)."""
    max_length: int = 512
    """Tokens per example; longer responses are truncated, longer prompts skipped."""
    format: str = "auto"
    """Data format: auto | messages | sharegpt | prompt_completion | alpaca | orca | hh."""
    split: str = "train"
    """Split, for hub datasets."""
    limit: int | None = None
    """Use only the first N rows."""
    sample: int | None = None
    """Use a seeded random sample of N rows (input order kept)."""
    drop_duplicates: bool = False
    """Drop exact duplicate rows instead of failing."""
    merge: bool = False
    """Also save merged full weights to OUTPUT_DIR/merged (safetensors)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        cfg.require(bool(self.data), "data", "required (e.g. OUT/selected.jsonl)")
        cfg.require(bool(self.output_dir), "output_dir", "required")
        for name in ("epochs", "batch_size", "micro_batch_size", "max_length"):
            cfg.require(getattr(self, name) > 0, name, "must be positive")
        cfg.require_positive(self, "lr", "limit", "sample")


def sft_step(model, optimizer, batches, weights, scale: float, accelerator) -> dict[str, float]:
    """One (optionally weighted) SFT step: mean_i w_i ℓ_i over the global batch.

    `scale` is world_size / global batch size: each process sums its share of the batch and
    DDP *averages* gradients over processes, so the factor world_size makes the result the
    full-batch mean on every rank (0 for a rank that only keeps DDP company, see `run_finetune`).
    """
    loss_sum = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            losses = per_example_loss(model, batch)
            w = weights[batch["positions"]] if weights is not None else torch.ones_like(losses)
            accelerator.backward((w * losses).sum() * scale)
        loss_sum += (w * losses.detach()).sum() * scale
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": accelerator.reduce(loss_sum, reduction="mean").item()}


def _read_weights(args: FinetuneArgs) -> list[dict] | None:
    """The rows of --weights-from, checked (before the model loads, so a bad file fails fast)."""
    if not args.weights_from:
        return None
    rows = read_jsonl(args.weights_from)
    for number, row in enumerate(rows, start=1):
        if "id" not in row or not isinstance(row.get("weight"), int | float | None):
            raise DataError(f"--weights-from {args.weights_from} row {number}: expected "
                            "{id, weight} rows, as in a select run's scores.jsonl")
    return [r for r in rows if r.get("weight") is not None]


def _example_weights(args: FinetuneArgs, rows: list[dict] | None,
                     ids: list[str]) -> torch.Tensor | None:
    if rows is None:
        return None
    scores = align_scores([r["id"] for r in rows], np.array([r["weight"] for r in rows]), ids,
                          args.weights_from)
    return torch.tensor(scores, dtype=torch.float32)


def run_finetune(args: FinetuneArgs) -> dict:
    started = time.perf_counter()
    out = Path(args.output_dir)
    if process_state().is_main_process:
        cfg.start_run(args, "finetune")
    process_state().wait_for_everyone()
    torch.manual_seed(args.seed)
    accelerator = make_accelerator(out)
    examples = load_examples(args.data, args.split, args.format, args.limit, args.drop_duplicates)
    examples = sample_rows(examples, args.sample, args.seed)
    cfg.check_resume_data(out, {"data": examples}, args.resume)
    weight_rows = _read_weights(args)
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, args.chat_template,
                                                args.trust_remote_code)
    tokenized = tokenize_examples(examples, tokenizer, args.max_length, args.num_proc)
    require_usable(tokenized, args.data, args.max_length)
    ids = ids_at(examples, tokenized.rows)
    weights = _example_weights(args, weight_rows, ids)
    model = add_lora_adapters(model, lora_settings(args), (ADAPTER,),
                              args.gradient_checkpointing)
    optimizer = torch.optim.Adam(adapter_parameters(model, ADAPTER), lr=args.lr)
    # The standard Accelerate path: DDP, FSDP or DeepSpeed, whichever `accelerate launch` set.
    model, optimizer = accelerator.prepare(model, optimizer)
    sharded = _require_sharding_support(accelerator, args)
    if weights is not None:
        weights = weights.to(accelerator.device)
    device, pad = accelerator.device, tokenizer.pad_token_id

    def step(ft_micro, _safe, _progress, batch, _safe_total):
        # A rank whose shard of a short last batch is empty still has to join DDP's gradient
        # all-reduce: it runs one row with weight 0.
        scale = accelerator.num_processes / len(batch) if ft_micro else 0.0
        batches = [collate(tokenized, m, pad, device) for m in (ft_micro or [[0]])]
        return sft_step(model, optimizer, batches, weights, scale, accelerator)

    settings = LoopSettings(
        epochs=args.epochs, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
        safe_batch_size=0, seed=args.seed, save_every=args.save_every,
        rank=accelerator.process_index, world=accelerator.num_processes,
        show_progress=args.show_progress,
    )
    model.train()
    checkpoint = None if sharded else adapter_checkpoint(
        out, accelerator.unwrap_model(model), {ADAPTER: "adapter"}, {"optimizer": optimizer})
    state = train_loop(len(tokenized), 0, settings, step, out / "metrics.jsonl",
                       checkpoint, args.resume,
                       describe=lambda ps: ", ".join(ids[p] for p in ps[:8]),
                       log=partial(log_metrics, accelerator))
    finish_logging(accelerator)
    summary = {"rows": len(examples), "usable": len(tokenized), "skipped": tokenized.skipped,
               "truncated": len(tokenized.truncated), "steps": state.global_step,
               "train_seconds": round(state.elapsed, 2), "weighted": weights is not None,
               "processes": accelerator.num_processes}
    # Under FSDP / ZeRO-3 the adapter is sharded: every rank takes part in gathering it.
    state_dict = accelerator.get_state_dict(model) if sharded else None
    if accelerator.is_main_process:
        _save_outputs(accelerator.unwrap_model(model), tokenizer, out, args.merge, state_dict)
        summary["wall_seconds"] = round(time.perf_counter() - started, 2)
        summary["peak_memory_mb"] = round(peak_memory_mb(), 1)
        write_json(out / "summary.json", summary)
    return summary


def _require_sharding_support(accelerator, args: FinetuneArgs) -> bool:
    """Whether the model is sharded (FSDP / DeepSpeed); refuses what is not supported there."""
    engine = sharding_engine(accelerator)
    if engine:
        cfg.require(not (args.save_every or args.resume), "save_every",
                    f"checkpoints and --resume run under DDP only; under {engine} the optimizer "
                    "state is sharded (drop --save-every / --resume, or use configs/accelerate/"
                    "ddp.yaml)")
        cfg.require(not args.merge, "merge", f"cannot merge a sharded model under {engine}; "
                    "merge the saved adapter afterwards (peft merge_and_unload)")
    return engine is not None


def _save_outputs(model, tokenizer, out: Path, merge: bool, state_dict=None) -> None:
    _save_folder(out / "adapter", lambda tmp: model.save_pretrained(
        tmp, selected_adapters=[ADAPTER], safe_serialization=True, state_dict=state_dict),
        tokenizer)
    if merge:
        merged = model.merge_and_unload()
        _save_folder(out / "merged",
                     lambda tmp: merged.save_pretrained(tmp, safe_serialization=True), tokenizer)


def _save_folder(target: Path, save, tokenizer) -> None:
    """Write a model folder next to `target`, then swap it in, so a kill never leaves a
    half-written adapter where tools would load it."""
    import shutil

    tmp = target.with_name(target.name + ".tmp")
    record_output(target.parent, tmp.name, target.name)
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
