"""Fit the SEAL selector: build the model, adapters and optimisers, then run the bilevel step
(`bilevel.py`) inside the shared loop (`train.py`)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch

from sealft import bilevel
from sealft.data import Example, ids_at
from sealft.models import (
    adapter_parameters,
    add_lora_adapters,
    load_model_and_tokenizer,
)
from sealft.runtime import (
    finish_logging,
    gradient_sync,
    log_metrics,
    lora_settings,
    make_accelerator,
    require_data_parallel,
)
from sealft.selector import Selector
from sealft.tokenize import collate, tokenize_inputs
from sealft.train import LoopSettings, adapter_checkpoint, train_loop


def learn_selector(args, examples: list[Example], safe: list[Example], out: Path):
    """Returns (logits, weights, skipped, summary extras), one score per input row."""
    torch.manual_seed(args.seed)
    accelerator = make_accelerator(out)
    require_data_parallel(accelerator)
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, args.chat_template,
                                                args.trust_remote_code)
    tokenized, safe_tok = tokenize_inputs(args, tokenizer, examples, safe)
    two_adapters = args.algorithm in ("penalty", "safety-step")
    adapters = (bilevel.THETA, bilevel.THETA_PRIME) if two_adapters else (bilevel.THETA,)
    model = add_lora_adapters(model, lora_settings(args), adapters,
                              args.gradient_checkpointing).to(accelerator.device)
    selector = Selector(len(tokenized), args.weighting).to(accelerator.device)
    optimizer_cls = bilevel.SELECTOR_OPTIMIZERS[args.selector_optimizer]
    parts = bilevel.BilevelParts(
        model=model,
        selector=selector,
        theta_optimizer=torch.optim.Adam(adapter_parameters(model, bilevel.THETA), lr=args.lr),
        selector_optimizer=optimizer_cls(selector, args.selector_lr),
        theta_prime_optimizer=torch.optim.Adam(
            adapter_parameters(model, bilevel.THETA_PRIME), lr=args.lr
        ) if two_adapters else None,
        sync_gradients=gradient_sync(accelerator),
        safety_step_size=args.safety_step_size,
    )
    step_rule = bilevel.ALGORITHMS[args.algorithm]
    pad = tokenizer.pad_token_id
    device = accelerator.device

    def to_batch(data, positions: list[int]):
        if isinstance(data, tuple):  # preference pairs
            return {"chosen": to_batch(data[0], positions),
                    "rejected": to_batch(data[1], positions)}
        return {k: v.to(device) for k, v in collate(data, positions, pad).items()}

    def step(ft_micro, safe_micro, progress, batch, safe_total):
        gamma = bilevel.gamma_at(args.gamma_schedule, args.gamma_start, args.gamma_increment,
                                 int(progress), progress)
        return step_rule(parts, [to_batch(tokenized, m) for m in ft_micro],
                         [to_batch(safe_tok, m) for m in safe_micro], gamma, len(batch),
                         safe_total, visited=torch.tensor(batch))

    ids = ids_at(examples, tokenized.rows)
    settings = LoopSettings(
        epochs=args.epochs, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
        safe_batch_size=args.safe_batch_size, seed=args.seed, save_every=args.save_every,
        rank=accelerator.process_index, world=accelerator.num_processes,
        show_progress=args.show_progress,
    )
    model.train()
    state = train_loop(
        len(tokenized), len(safe_tok[0] if isinstance(safe_tok, tuple) else safe_tok),
        settings, step, out / "metrics.jsonl",
        adapter_checkpoint(out, model, {a: a for a in adapters}, {
            "theta": parts.theta_optimizer, "theta_prime": parts.theta_prime_optimizer,
            "selector": parts.selector_optimizer}, {"logits": selector.logits}), args.resume,
        describe=lambda positions: ", ".join(ids[p] for p in positions[:8]),
        log=partial(log_metrics, accelerator),
    )
    finish_logging(accelerator)
    learned = selector.logits.detach().cpu().numpy()
    learned_weights = selector.weights().detach().cpu().numpy()
    if accelerator.is_main_process:
        selector.save(out / "selector.safetensors", ids)
    logits, weights = _per_row(len(examples), tokenized.rows, learned, learned_weights)
    extra = {"algorithm": args.algorithm, "steps": state.global_step,
             "train_seconds": round(state.elapsed, 2), "truncated": len(tokenized.truncated),
             "processes": accelerator.num_processes}
    return logits, weights, tokenized.skipped, extra


def _per_row(n: int, rows: list[int], logits: np.ndarray, weights: np.ndarray):
    full_logits, full_weights = np.full(n, np.nan), np.full(n, np.nan)
    full_logits[rows], full_weights[rows] = logits, weights
    return full_logits, full_weights
