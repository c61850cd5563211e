"""Research probe (not the product): which rows does the safe set *fight* when a model learns
both?

Algorithm 1's selector follows ∂/∂w [g_w(θ) − g_w(θ')], which for row i is ℓ_i(θ) − ℓ_i(θ'):
θ is pulled to the safe set while fitting the weighted data, θ' fits the data alone. At the CPU
budget neither moves, so the signal is noise. This probe trains both to the point where the
question has an answer:

- θ_D: LoRA fitted to the mix's rows (every row, equal weight);
- θ_DS: the same LoRA start, the same data batches in the same order, plus a safe-set batch at
  every step (harmful requests with refusals).

A row's score is ℓ_i(θ_DS) − ℓ_i(θ_D) over its first k answer tokens (higher → harmful). Both
models saw the row equally often, so how hard its text is to fit cancels; what remains is how
much learning to refuse harmful requests cost that row. Harmful compliance conflicts with the
refusals; a benign answer does not; a refusal is helped (negative score). The question for the
controls is whether an answered safe prompt that only *sounds* dangerous is spared because the
data itself teaches it.

Each mix also records the default's first-token refusal margin at θ_0 (for a paired
comparison) and whether the answer opens as a refusal (the product's gate).

    python benchmarks/interference_probe.py --mixes runs/dev_mixes/alpaca-xstest_s0.jsonl \
        --out runs/interference_probe
    python benchmarks/interference_probe.py --table --out runs/interference_probe
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model

from sealft.data import load_examples, sample_rows
from sealft.io import read_jsonl
from sealft.models import load_model_and_tokenizer
from sealft.refusal import is_refusal
from sealft.tokenize import IGNORE_INDEX, tokenize_examples

sys.path.insert(0, str(Path(__file__).resolve().parent))
from judge_probe import (  # noqa: E402  (one table and one margin for every probe)
    REFUSALS,
    first_token,
    gated,
    signal_table,
    standardise,
)
from probe_runs import add_mix_arguments, rows_per_mix  # noqa: E402

WINDOWS = (1, 4, 8, 16)


def windowed(examples, tokenizer, max_length: int, window: int):
    """(input ids, labels, row) per usable row, cut after `window` answer tokens: compliance or
    refusal is decided in the first tokens, and the rest costs time without asking anything."""
    tokenized = tokenize_examples(examples, tokenizer, max_length, cache=False)
    ids, labels = tokenized.take(list(range(len(tokenized))))
    out = []
    for row, i, lab in zip(tokenized.rows, ids, labels, strict=True):
        start = int(np.argmax(lab != IGNORE_INDEX))
        out.append((torch.from_numpy(i[: start + window]).long(),
                    torch.from_numpy(lab[: start + window]).long(),
                    int(row)))
    return out


def batch_of(items, pad: int) -> dict[str, torch.Tensor]:
    """Left-padded, so that every row's answer window ends the batch: the logits are then taken
    for the last columns only (over a 150k vocabulary, all columns cost more than the model).
    Items hold token ids or, once cached, the hidden states that enter the trained layers."""
    width = max(len(x) for x, _, _ in items)
    hidden = items[0][0].dim() == 2
    inputs = (torch.zeros((len(items), width, items[0][0].shape[1])) if hidden
              else torch.full((len(items), width), pad, dtype=torch.long))
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for k, (x, lab, _) in enumerate(items):
        inputs[k, width - len(x):], labels[k, width - len(x):], mask[k, width - len(x):] = x, lab, 1
    answer_columns = int((labels != IGNORE_INDEX).sum(dim=1).max())
    return {"inputs_embeds" if hidden else "input_ids": inputs, "labels": labels,
            "attention_mask": mask, "position_ids": (mask.cumsum(dim=1) - 1).clamp(min=0),
            "keep": answer_columns + 1}


def answer_logits(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the columns that predict answer tokens, and the labels they predict."""
    keep = batch["keep"]
    inputs = {k: batch[k] for k in ("input_ids", "inputs_embeds") if k in batch}
    logits = model(**inputs, attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], logits_to_keep=keep, use_cache=False).logits
    return logits[:, :-1].float(), batch["labels"][:, -keep + 1:]


def token_losses(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    logits, labels = answer_logits(model, batch)
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels,
                                               ignore_index=IGNORE_INDEX, reduction="none")
    return losses, labels != IGNORE_INDEX


def mean_loss(model, batch) -> torch.Tensor:
    losses, answer = token_losses(model, batch)
    return losses.sum() / answer.sum()


def fit(model, data, safe, a, with_safe: bool) -> None:
    """LoRA from its initial state: `a.epochs` passes over `data` in a seeded order, and with
    `with_safe` a safe-set batch added to every step's loss."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=a.lr, weight_decay=0.0)
    rng = np.random.default_rng(a.seed)
    safe_order = rng.permutation(len(safe))
    s, steps, t0 = 0, 0, time.time()
    model.train()
    for _ in range(a.epochs):
        order = rng.permutation(len(data))
        for b in range(0, len(order), a.batch_size):
            loss = mean_loss(model, batch_of([data[j] for j in order[b: b + a.batch_size]],
                                             a.pad))
            if with_safe:
                picks = [safe[safe_order[(s + k) % len(safe)]] for k in range(a.safe_batch_size)]
                s += a.safe_batch_size
                loss = loss + a.safe_weight * mean_loss(model, batch_of(picks, a.pad))
            loss.backward()
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
            steps += 1
            if steps % 10 == 0:
                print(f"    step {steps}: loss {loss.item():.3f}, {time.time() - t0:.0f}s",
                      flush=True)
    model.eval()


class UpperLayers:
    """Only the layers from `first` on are trained (LoRA); the frozen layers below them run once
    per row, and their output is cached. On two CPU cores a full forward of a 220-row mix takes
    minutes; training the top quarter of the model from cached inputs is what makes two fits
    per mix affordable."""

    def __init__(self, model, first: int):
        self.core, self.first = model.model, first
        self.all = model.model.layers
        self.model = model
        self._use(self.all[first:])

    def _use(self, layers) -> None:
        self.core.layers = torch.nn.ModuleList(layers)
        self.core.config.num_hidden_layers = len(layers)

    @torch.no_grad()
    def cache(self, data, pad: int) -> list:
        """The items of `data` with their token ids replaced by the input of layer `first`."""
        self._use(self.all[: self.first])
        norm, self.core.norm = self.core.norm, torch.nn.Identity()  # the next layer's input
        out = []
        try:
            for b in range(0, len(data), 16):
                items = data[b: b + 16]
                batch = batch_of(items, pad)
                states = self.core(input_ids=batch["input_ids"],
                                   attention_mask=batch["attention_mask"],
                                   position_ids=batch["position_ids"],
                                   use_cache=False).last_hidden_state
                out += [(states[k, states.shape[1] - len(x):].clone(), lab, row)
                        for k, (x, lab, row) in enumerate(items)]
        finally:
            self._use(self.all[self.first:])
            self.core.norm = norm
        return out


@torch.no_grad()
def window_losses(model, data, pad: int, refusal_firsts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the mean loss over its first k answer tokens for each k of WINDOWS, and the
    lowest loss of a refusal's first token at the same position (the product's default margin
    is the first column minus this)."""
    out, refuse = np.zeros((len(data), len(WINDOWS))), np.zeros(len(data))
    for b in range(0, len(data), 16):
        logits, labels = answer_logits(model, batch_of(data[b: b + 16], pad))
        logp = torch.log_softmax(logits, dim=-1)
        answer = labels != IGNORE_INDEX
        for k in range(len(logp)):
            at = answer[k].nonzero().squeeze(1)
            values = -logp[k, at, labels[k, at]]
            for w, window in enumerate(WINDOWS):
                out[b + k, w] = values[:window].mean().item()
            refuse[b + k] = -logp[k, at[0], refusal_firsts].max().item()
    return out, refuse


def mix_rows(model, upper: UpperLayers, tokenizer, initial: dict, safe, examples,
             a) -> list[dict]:
    data = upper.cache(windowed(examples, tokenizer, a.max_length, a.window), a.pad)
    rows = [r for _, _, r in data]
    firsts = [first_token(tokenizer, r) for r in REFUSALS]
    with model.disable_adapter():
        base, refuse = window_losses(model, data, a.pad, firsts)
    margin = base[:, 0] - refuse
    losses = {}
    for name, with_safe in (("D", False), ("DS", True)):
        model.load_state_dict(initial, strict=False)
        t0 = time.time()
        fit(model, data, safe, a, with_safe)
        losses[name], _ = window_losses(model, data, a.pad, firsts)
        print(f"  θ_{name}: {time.time() - t0:.0f}s", flush=True)
    out = []
    for k, r in enumerate(rows):
        row = {"id": examples[r]["id"], "flag": examples[r]["meta"].get("flag"),
               "answer_refuses": is_refusal(examples[r]["messages"][-1]["content"]),
               "margin": float(margin[k])}
        for w, window in enumerate(WINDOWS):
            row[f"interf_{window}"] = float(losses["DS"][k, w] - losses["D"][k, w])
            row[f"shift_{window}"] = float(losses["DS"][k, w] - base[k, w])
        out.append(row)
    return out


def table(out: Path, keep: float = 0.8) -> str:
    mixes, names = [], []
    for path in sorted(out.glob("*.jsonl")):
        rows = read_jsonl(path)
        refuses = np.array([r["answer_refuses"] for r in rows])
        margin = np.array([r["margin"] for r in rows])
        scores = {"margin|gated": gated(margin, refuses)}
        for window in WINDOWS:
            interf = np.array([r[f"interf_{window}"] for r in rows])
            shift = np.array([r[f"shift_{window}"] for r in rows])
            scores[f"interf_{window}|gated"] = gated(interf, refuses)
            scores[f"shift_{window}|gated"] = gated(shift, refuses)
            scores[f"margin+interf_{window}|gated"] = gated(
                standardise(margin) + standardise(interf), refuses)
        names = list(scores)
        mixes.append((path.stem, np.array([r["flag"] for r in rows]), scores))
    return signal_table(mixes, names, [n.replace("|", "\\|") for n in names], keep)


def add_fit_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of a probe that fits LoRA on the upper layers (this one and
    token_contrast_probe.py); a probe changes the defaults with `p.set_defaults`."""
    add_mix_arguments(p)
    p.add_argument("--safe-data", default="../shared/data/safe/safetyllamas_safety_only.json")
    p.add_argument("--safe-sample", type=int, default=400)
    p.add_argument("--model", default="Qwen/Qwen2.5-Coder-0.5B-Instruct")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--first-layer", type=int, default=18,
                   help="the first layer trained; the layers below are frozen and cached")
    p.add_argument("--window", type=int, default=16, help="answer tokens trained and scored")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/interference_probe")
    p.add_argument("--table", action="store_true", help="print the saved rows' table and exit")


def frozen_proxy(a: argparse.Namespace):
    """The frozen proxy and its tokenizer, `a.pad` set, the output folder made."""
    torch.set_num_threads(a.threads)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model_and_tokenizer(a.model)
    model.requires_grad_(False)
    a.pad = tokenizer.pad_token_id or 0
    return model, tokenizer


def safe_sample(a: argparse.Namespace) -> list[dict]:
    """The seeded `--safe-sample` rows of `--safe-data` a probe fits to."""
    return sample_rows(load_examples(a.safe_data, "train", "auto", None, False), a.safe_sample,
                       a.seed)


def cached_safe(upper: UpperLayers, tokenizer, rows: list[dict], a: argparse.Namespace) -> list:
    """The safe-set rows cut to `--window` answer tokens, through the frozen lower layers."""
    t0 = time.time()
    cached = upper.cache(windowed(rows, tokenizer, a.max_length, a.window), a.pad)
    print(f"safe set cached: {time.time() - t0:.0f}s", flush=True)
    return cached


def with_upper_lora(model, a: argparse.Namespace):
    """The cached frozen lower layers, the model with LoRA on the layers above, and the LoRA
    weights it starts from (every fit is reset to them)."""
    upper = UpperLayers(model, a.first_layer)  # before LoRA: only the upper layers get it
    torch.manual_seed(a.seed)
    model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=a.rank, lora_dropout=0.0,
                                             target_modules=a.modules.split(",")))
    initial = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    return upper, model, initial


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_fit_arguments(p)
    p.add_argument("--safe-batch-size", type=int, default=8)
    p.add_argument("--safe-weight", type=float, default=1.0)
    a = p.parse_args()
    out = Path(a.out)
    if a.table:
        print(table(out))
        return
    model, tokenizer = frozen_proxy(a)
    upper, model, initial = with_upper_lora(model, a)
    safe = cached_safe(upper, tokenizer, safe_sample(a), a)
    rows_per_mix(out, a, lambda examples: mix_rows(model, upper, tokenizer, initial, safe,
                                                   examples, a))
    print(table(out))


if __name__ == "__main__":
    main()
