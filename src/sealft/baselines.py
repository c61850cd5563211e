"""Baseline selectors (`sealft select --method all|random|dsir|reference-loss`) and the SafeInstr
data mix.

Every selector returns one (logit, weight) per input row, higher weight = keep, NaN for rows
that cannot be trained on. All selectors drop the *same* unusable rows (those the model's chat
template cannot tokenise within max_length), so at a given keep ratio every method keeps the same
number of rows out of the same pool and the comparison with SEAL is like for like. This costs a
tokenizer load (not the model) for the model-free methods.

Weights follow SEAL's convention of mean ≈ 1 so `finetune --weights-from` stays meaningful:
  all             weight 1, logit 0 everywhere. With keep_ratio < 1 the tie is broken by example
                  id (`selector.keep_mask`): a fixed, content-hashed subset, the same for every
                  seed. Use `random` for a seeded random subset.
  random          u ~ U(0,1) from a hash of (seed, id): weight 2u, logit log(u / (1-u)). Hashing
                  the id rather than drawing by position keeps the choice independent of row order.
  dsir            hashed n-gram DSIR (Xie et al. 2023, the `data-selection` package) with the safe
                  set as target: logit = log importance weight, weight = 2·sigmoid(z-score).
  reference-loss  logit = loss under the base model − loss after `reference_steps` LoRA steps on
                  the safe set (examples the safety update makes *less* likely score low).
                  weight = 2·sigmoid(z-score).
  oracle          the ground truth as a selector (the best any data filter can do): rows whose
                  label_field equals unsafe_value are unusable to it (weight NaN, skipped with
                  the reason "oracle: ..."), every other row weighs 1. At keep_ratio 1 it keeps
                  exactly the unflagged rows (the experiment grid runs it there).

The z-scored sigmoid keeps the ranking exactly (no underflow, unlike a softmax over DSIR's
unnormalised log-ratios of hundreds of nats) while bounding weights to (0, 2).

SafeInstr (Bianchi et al. 2024) is a data mix, not a selector: `safeinstr_mix` appends k safety
examples to any selection, `write_safeinstr` writes OUT/selected_safeinstr.jsonl.
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sealft.data import Example, ids_at, load_examples
from sealft.errors import ConfigError, DataError
from sealft.io import append_jsonl, write_json, write_jsonl
from sealft.tokenize import Tokenized, collate

REFERENCE_ADAPTER = "reference"
SAFEINSTR_FILE = "selected_safeinstr.jsonl"
SAFEINSTR_INFO_FILE = "safeinstr.json"  # the counts write_safeinstr adds beside it


def score_baseline(args, examples: list[Example], safe: list[Example], out: Path):
    """Dispatch from `run_select`: returns (logits, weights, skipped, summary extras)."""
    scorers = {"all": _score_all, "random": _score_random, "dsir": _score_dsir,
               "reference-loss": _score_reference_loss, "oracle": _score_oracle}
    if args.method not in scorers:
        raise ConfigError(f"--method {args.method!r}: no baseline of that name; use one of "
                          f"{', '.join(scorers)}")
    return scorers[args.method](args, examples, safe, out)


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _tokenize_for_skips(args, examples: list[Example]) -> Tokenized:
    """The model-free methods tokenise only to learn which rows SEAL would skip."""
    from sealft.models import load_tokenizer
    from sealft.tokenize import require_usable, tokenize_examples

    tokenizer = load_tokenizer(args.model, args.chat_template, args.trust_remote_code)
    tokenized = tokenize_examples(examples, tokenizer, args.max_length, args.num_proc,
                                  desc="tokenising fine-tuning data")
    require_usable(tokenized, args.finetune_data, args.max_length)
    return tokenized


def _per_row(n: int, rows: list[int], values: np.ndarray) -> np.ndarray:
    full = np.full(n, np.nan)
    full[rows] = values
    return full


def squash(logits: np.ndarray) -> np.ndarray:
    """2·sigmoid of the z-scored logits: rank-preserving, bounded, mean weight ≈ 1."""
    logits = np.asarray(logits, dtype=np.float64)
    std = logits.std()
    z = (logits - logits.mean()) / std if std > 0 else np.zeros_like(logits)
    return 2.0 / (1.0 + np.exp(-z))


def example_text(example: Example) -> str:
    """The text DSIR featurises: every message's content, prompt and response alike."""
    return "\n".join(m["content"] for m in example["messages"])


def _result(n: int, tokenized: Tokenized, logits: np.ndarray, weights: np.ndarray,
            extra: dict[str, Any]):
    extra = {"truncated": len(tokenized.truncated), **extra}
    return (_per_row(n, tokenized.rows, logits), _per_row(n, tokenized.rows, weights),
            tokenized.skipped, extra)


# ---------------------------------------------------------------------------------------------
# all / random
# ---------------------------------------------------------------------------------------------


def _score_all(args, examples: list[Example], safe: list[Example], out: Path):
    tokenized = _tokenize_for_skips(args, examples)
    zeros = np.zeros(len(tokenized))
    return _result(len(examples), tokenized, zeros, zeros + 1.0,
                   {"note": "all rows weigh 1; keep_ratio < 1 keeps an id-hashed subset"})


def hashed_uniform(ids: Iterable[str], seed: int) -> np.ndarray:
    """One U(0,1) draw per id, a pure function of (seed, id)."""
    draws = []
    for ex_id in ids:
        digest = hashlib.sha256(f"{seed}\x1f{ex_id}".encode()).digest()
        draws.append((int.from_bytes(digest[:8], "big") + 0.5) / 2**64)
    return np.array(draws)


def _score_random(args, examples: list[Example], safe: list[Example], out: Path):
    tokenized = _tokenize_for_skips(args, examples)
    u = hashed_uniform(ids_at(examples, tokenized.rows), args.seed)
    return _result(len(examples), tokenized, np.log(u / (1 - u)), 2 * u, {"seed": args.seed})


# ---------------------------------------------------------------------------------------------
# DSIR
# ---------------------------------------------------------------------------------------------


def dsir_log_weights(texts: list[str], target_texts: list[str], ngrams: int,
                     num_buckets: int = 10000) -> np.ndarray:
    """Hashed n-gram DSIR log importance weights of `texts` toward `target_texts`.

    The package reads and writes files, so both sides go through a temporary folder. One
    process keeps its single shard in input order (its shards interleave rows otherwise).
    """
    from data_selection import HashedNgramDSIR

    with tempfile.TemporaryDirectory(prefix="sealft-dsir-") as tmp:
        raw, target = Path(tmp) / "raw.jsonl", Path(tmp) / "target.jsonl"
        write_jsonl(raw, ({"text": t} for t in texts))
        write_jsonl(target, ({"text": t} for t in target_texts))
        dsir = HashedNgramDSIR([str(raw)], [str(target)], cache_dir=str(Path(tmp) / "cache"),
                               num_proc=1, ngrams=ngrams, num_buckets=num_buckets)
        dsir.fit_importance_estimator(num_tokens_to_fit="all")
        dsir.compute_importance_weights()
        weights = np.load(dsir.log_importance_weights_dir / "0.npy")
    if len(weights) != len(texts):
        raise DataError(f"DSIR returned {len(weights)} weights for {len(texts)} rows "
                        "(an empty line in the data?)")
    return weights.astype(np.float64)


def _score_dsir(args, examples: list[Example], safe: list[Example], out: Path):
    if not safe:
        raise ConfigError("--safe-data: DSIR needs the safe set as its target distribution")
    if args.dsir_ngrams < 1:
        raise ConfigError(f"--dsir-ngrams: must be >= 1, got {args.dsir_ngrams}")
    tokenized = _tokenize_for_skips(args, examples)
    texts = [example_text(examples[r]) for r in tokenized.rows]
    logits = dsir_log_weights(texts, [example_text(e) for e in safe], args.dsir_ngrams)
    return _result(len(examples), tokenized, logits, squash(logits),
                   {"dsir_ngrams": args.dsir_ngrams, "dsir_target_rows": len(safe)})


# ---------------------------------------------------------------------------------------------
# Oracle (ground truth)
# ---------------------------------------------------------------------------------------------


def oracle_flags(examples: list[Example], field: str | None, unsafe_value: str) -> np.ndarray:
    """True where a row's ground-truth field marks it harmful. Every row must carry the field:
    a row without it would be kept silently, and the oracle would no longer be exact."""
    if not field:
        raise ConfigError("--method oracle needs --label-field (the ground-truth column, e.g. "
                          "flag) and --unsafe-value (the value that marks a harmful row)")
    missing = [e["index"] for e in examples if e["meta"].get(field) is None]
    if missing:
        raise DataError(f"--label-field {field!r}: absent from {len(missing)} of "
                        f"{len(examples)} rows (first: row {missing[0]}); --method oracle "
                        "needs the ground truth on every row")
    return np.array([str(e["meta"][field]) == unsafe_value for e in examples])


def _score_oracle(args, examples: list[Example], safe: list[Example], out: Path):
    flags = oracle_flags(examples, args.label_field, args.unsafe_value)  # before the tokenizer
    tokenized = _tokenize_for_skips(args, examples)
    # Flagged rows leave the pool as unusable, so the keep count is a share of the unflagged
    # rows: keep_ratio 1 keeps all of them and nothing else, whatever the harmful share.
    reason = f"oracle: {args.label_field}={args.unsafe_value}"
    skipped = dict(tokenized.skipped)
    skipped.update({examples[r]["id"]: reason for r in tokenized.rows if flags[r]})
    ones = np.ones(len(tokenized))
    logits = _per_row(len(examples), tokenized.rows, ones - 1)
    weights = _per_row(len(examples), tokenized.rows, ones)
    logits[flags], weights[flags] = np.nan, np.nan
    extra = {"truncated": len(tokenized.truncated), "oracle_removed": int(flags.sum()),
             "note": "ground truth: flagged rows removed, the rest weigh 1"}
    return logits, weights, skipped, extra


# ---------------------------------------------------------------------------------------------
# Reference loss (ablation)
# ---------------------------------------------------------------------------------------------


def _score_reference_loss(args, examples: list[Example], safe: list[Example], out: Path):
    from sealft.models import add_lora_adapters, load_model_and_tokenizer
    from sealft.runtime import lora_settings, make_accelerator
    from sealft.tokenize import tokenize_inputs

    if args.reference_steps < 1:
        raise ConfigError(f"--reference-steps: must be >= 1, got {args.reference_steps}")
    torch.manual_seed(args.seed)
    accelerator = make_accelerator(out, log=False)
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, args.chat_template,
                                                args.trust_remote_code)
    tokenized, safe_tok = tokenize_inputs(args, tokenizer, examples, safe)
    model = add_lora_adapters(model, lora_settings(args), (REFERENCE_ADAPTER,),
                              args.gradient_checkpointing)
    model = model.to(accelerator.device)
    batcher = _Batcher(tokenizer.pad_token_id, accelerator.device, args.micro_batch_size)
    final_loss = train_reference(model, safe_tok, batcher, args, out / "metrics.jsonl")
    reference = example_losses(model, tokenized, batcher)
    with model.disable_adapter():
        base = example_losses(model, tokenized, batcher)
    # A rise in loss under the safety update means the example pulls against safety.
    logits = base - reference
    accelerator.end_training()
    return _result(len(examples), tokenized, logits, squash(logits),
                   {"reference_steps": args.reference_steps,
                    "reference_final_safe_loss": round(final_loss, 5),
                    "mean_loss_change": float(np.mean(reference - base))})


class _Batcher:
    """Collates positions of a Tokenized into device batches of at most `micro` rows."""

    def __init__(self, pad_id: int, device, micro: int):
        self.pad_id, self.device, self.micro = pad_id, device, micro

    def __call__(self, tokenized: Tokenized, positions: list[int]):
        for start in range(0, len(positions), self.micro):
            batch = collate(tokenized, positions[start:start + self.micro], self.pad_id)
            yield {k: v.to(self.device) for k, v in batch.items()}


def _safe_batches(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """`steps` batches drawn from seeded reshuffles of the safe set (epochs as needed)."""
    rng = random.Random(seed)
    order: list[int] = []
    batches = []
    size = min(batch_size, n)
    for _ in range(steps):
        if len(order) < size:
            fresh = list(range(n))
            rng.shuffle(fresh)
            order += fresh
        batches.append(order[:size])
        order = order[size:]
    return batches


def train_reference(model, safe_tok: Tokenized, batcher: _Batcher, args,
                    metrics_path: Path) -> float:
    """LoRA SFT on the safe set; returns the last step's mean loss."""
    from sealft.losses import per_example_loss
    from sealft.models import adapter_parameters

    optimizer = torch.optim.Adam(adapter_parameters(model, REFERENCE_ADAPTER), lr=args.lr)
    model.train()
    loss_value = float("nan")
    batches = _safe_batches(len(safe_tok), args.safe_batch_size or args.batch_size,
                            args.reference_steps, args.seed)
    for step, positions in enumerate(batches, start=1):
        total = 0.0
        for batch in batcher(safe_tok, positions):
            losses = per_example_loss(model, batch)
            losses.sum().div(len(positions)).backward()
            total += losses.detach().sum().item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = total / len(positions)
        append_jsonl(metrics_path, {"step": step, "reference_safe_loss": round(loss_value, 6)})
    return loss_value


@torch.no_grad()
def example_losses(model, tokenized: Tokenized, batcher: _Batcher) -> np.ndarray:
    from sealft.losses import per_example_loss

    model.eval()
    # Sorting by length keeps padding (wasted compute) low; results go back by position.
    order = np.argsort(tokenized.lengths(), kind="stable").tolist()
    losses = np.zeros(len(tokenized))
    for batch in batcher(tokenized, order):
        losses[batch["positions"].cpu().numpy()] = per_example_loss(model, batch).cpu().numpy()
    return losses


# ---------------------------------------------------------------------------------------------
# SafeInstr data mix
# ---------------------------------------------------------------------------------------------


def safeinstr_mix(selected_examples: list[Example], safe_examples: list[Example], k: int,
                  seed: int) -> list[Example]:
    """The selection plus k seeded safety examples (fewer if the safe set is smaller). Safety
    rows already in the selection are not added twice; added rows carry meta source=safeinstr."""
    if k < 0:
        raise ConfigError(f"--safeinstr-k: must be >= 0, got {k}")
    taken = {e["id"] for e in selected_examples}
    pool = [e for e in safe_examples if e["id"] not in taken]
    picked = sorted(random.Random(seed).sample(range(len(pool)), min(k, len(pool))))
    added = [{**pool[i], "meta": {**pool[i]["meta"], "source": "safeinstr"}} for i in picked]
    return list(selected_examples) + added


def write_safeinstr(selection_dir: str | Path, safe_data: str, k: int, seed: int = 0,
                    safe_format: str = "auto", split: str = "train",
                    output: str | Path | None = None) -> dict[str, Any]:
    """Write SELECTION_DIR/selected_safeinstr.jsonl (selected.jsonl + k safety examples) in the
    selected.jsonl row format; returns counts (also written to safeinstr.json)."""
    folder = Path(selection_dir)
    selected_path = folder / "selected.jsonl"
    if not selected_path.is_file():
        raise DataError(f"{selected_path} does not exist; run `sealft select` first")
    selected = _read_selection(selected_path)
    safe = load_examples(safe_data, split, safe_format, drop_duplicates=True)
    mixed = safeinstr_mix(selected, safe, k, seed)
    target = Path(output) if output else folder / SAFEINSTR_FILE
    write_jsonl(target, ({"id": e["id"], "messages": e["messages"], **e["meta"]}
                         for e in mixed))
    info = {"selected": len(selected), "safety_added": len(mixed) - len(selected),
            "requested": k, "safe_data": safe_data, "seed": seed, "path": str(target)}
    write_json(folder / SAFEINSTR_INFO_FILE, info)
    return info


def _read_selection(path: Path) -> list[Example]:
    # An empty selection is legal here (k safety rows alone), but load_examples refuses it.
    if not path.read_text(encoding="utf-8").strip():
        return []
    return load_examples(str(path), fmt="messages")


def describe_mix(path: str | Path) -> dict[str, int]:
    """Counts of rows per source in a mixed file (for reports and tests)."""
    counts: dict[str, int] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        source = json.loads(line).get("source", "selected") if line.strip() else None
        if source:
            counts[source] = counts.get(source, 0) + 1
    return counts
