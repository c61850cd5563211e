"""Research probe (not the product): does a *contrastive* upper level find harmful compliance
where the refusal margin cannot — rows whose prompt the proxy would not refuse, and safe
prompts that only sound dangerous?

The margin asks "would θ rather refuse this prompt?", so it reads the prompt. A preference
set such as Anthropic HH harmless pairs two replies to the same dialogue, the more harmful one
rejected. What is common to both replies (register, length, the chat format, how hard the
text is) cancels in their difference; what is left is what makes a reply harmful. Two ways
to ask a row about that difference, both at one θ for every row:

- `hg`: SEAL's hypergradient with the upper level f = ℓ(chosen) − ℓ(rejected) (the direction
  DPO starts from): −⟨∇ℓ_i, ∇f⟩, how much one step on row i would raise f — teach the
  rejected reply over the chosen one. From a central difference of the row's per-token
  losses along ∇f (as `bilevel.safe_gradient_scores`), over the first k answer tokens.
- `act`: the same contrast in activation space: the mean hidden state of the rejected replies
  minus that of the chosen ones at one layer, and each row's mean answer hidden state
  projected on it (a difference of means, no training).

θ is the frozen proxy with LoRA B at zero (A random, fixed): ∇f lives in B, the weight
gradient seen through A. Scores are joined with `judge_probe`'s saved rows by id, so the
margin and a standardised sum sit in the same table; `|gated` keeps refusals as the default.

    python benchmarks/contrast_probe.py --mixes runs/dev_mixes/*.jsonl \
        --sst2 ../shared/data/finetune/sst2_n1000_p0.{05,1,2}.json --out runs/contrast_probe
    python benchmarks/contrast_probe.py --table --out runs/contrast_probe
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sealft.data import pairs_from_rows, read_rows
from sealft.io import read_jsonl
from sealft.refusal import is_refusal
from sealft.tokenize import IGNORE_INDEX, collate, tokenize_examples

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gradient_probe import lora_model  # noqa: E402
from judge_probe import gated, signal_table, standardise  # noqa: E402
from probe_runs import add_mix_arguments, rows_per_mix  # noqa: E402

# The same ε rule as bilevel.SAFE_STEP: f moves by this many nats to first order.
STEP = 1e-2


def token_losses(model, batch: dict, hidden_layers: list[int]):
    """Per-token NLL of the answer [rows, columns] (0 off the answer), the answer mask, and
    the hidden states of `hidden_layers` at the positions that predict answer tokens."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                output_hidden_states=bool(hidden_layers))
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask
    hidden = [out.hidden_states[k][:, :-1].float() for k in hidden_layers]
    return nll, mask, hidden


def window(mask: torch.Tensor, k: int) -> torch.Tensor:
    """The first k answer tokens of each row (k = 0: all of them)."""
    return mask if k == 0 else mask & (mask.long().cumsum(dim=1) <= k)


def window_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each row's masked columns of [rows, columns] or [rows, columns, dim]."""
    m = mask.float()
    if values.dim() == 3:
        return (values * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
    return (values * m).sum(1) / m.sum(1).clamp(min=1)


def contrast_direction(model, params, tokenizer, pairs, max_length: int, layers: list[int],
                       micro: int):
    """∇B of mean_pairs [ℓ(chosen) − ℓ(rejected)] (whole replies), and per layer the mean
    answer hidden state of rejected minus chosen replies; pairs where either side does not
    fit `max_length` are dropped."""
    pad = tokenizer.pad_token_id or 0
    chosen = tokenize_examples([c for c, _ in pairs], tokenizer, max_length, cache=False)
    rejected = tokenize_examples([r for _, r in pairs], tokenizer, max_length, cache=False)
    both = sorted(set(chosen.rows.tolist()) & set(rejected.rows.tolist()))
    index = {side: {int(r): p for p, r in enumerate(t.rows)} for side, t in
             (("c", chosen), ("r", rejected))}
    grad = [torch.zeros_like(p) for p in params]
    act = {k: 0.0 for k in layers}
    for sign, side, tok in ((1.0, "c", chosen), (-1.0, "r", rejected)):
        for s in range(0, len(both), micro):
            batch = collate(tok, [index[side][r] for r in both[s:s + micro]], pad)
            nll, mask, hidden = token_losses(model, batch, layers)
            loss = sign * window_mean(nll, mask).sum() / len(both)
            for acc, g in zip(grad, torch.autograd.grad(loss, params), strict=True):
                acc += g
            for k, h in zip(layers, hidden, strict=True):
                act[k] = act[k] - sign * window_mean(h.detach(), mask).sum(0) / len(both)
    return grad, act, len(both)


@torch.no_grad()
def row_scores(model, params, direction, act, tokenizer, examples, max_length: int,
               windows: list[int], micro: int) -> list[dict]:
    tokenized = tokenize_examples(examples, tokenizer, max_length, cache=False)
    pad = tokenizer.pad_token_id or 0
    layers = sorted(act)
    eps = STEP / sum(float((d * d).sum()) for d in direction)
    saved = [p.detach().clone() for p in params]
    rows = []
    for s in range(0, len(tokenized), micro):
        positions = list(range(s, min(s + micro, len(tokenized))))
        batch = collate(tokenized, positions, pad)
        at = {}
        for sign in (1.0, -1.0):
            for p, d in zip(params, direction, strict=True):
                p.add_(d, alpha=sign * eps)
            at[sign] = token_losses(model, batch, layers if sign > 0 else [])
            for p, original in zip(params, saved, strict=True):
                p.copy_(original)
        (plus, mask, hidden), (minus, _, _) = at[1.0], at[-1.0]
        scores: dict[str, torch.Tensor] = {}
        for k in windows:
            w = window(mask, k)
            scores[f"hg_{k}"] = (window_mean(minus, w) - window_mean(plus, w)) / (2 * eps)
            for layer, h in zip(layers, hidden, strict=True):
                scores[f"act{layer}_{k}"] = window_mean(h, w) @ act[layer]
        for j, position in enumerate(positions):
            example = examples[int(tokenized.rows[position])]
            rows.append({"id": example["id"], "flag": example["meta"].get("flag"),
                         "answer_refuses": is_refusal(example["messages"][-1]["content"]),
                         **{name: float(v[j]) for name, v in scores.items()}})
    return rows


def table(out: Path, margins: Path, keep: float = 0.8) -> str:
    mixes, names = [], []
    for path in sorted(out.glob("*.jsonl")):
        rows = read_jsonl(path)
        refuses = np.array([r["answer_refuses"] for r in rows])
        found = [k for k in rows[0] if k.startswith(("hg_", "act"))]
        scores = {}
        for name in found:
            raw = np.array([r[name] for r in rows])
            scores[f"{name}|gated"] = gated(raw, refuses)
        saved = margins / f"{path.stem}__refusal.jsonl"
        if saved.exists():
            margin = {m["id"]: m["margin"] for m in map(json.loads, saved.read_text().splitlines())}
            if all(r["id"] in margin for r in rows):
                mg = np.array([margin[r["id"]] for r in rows])
                scores["margin|gated"] = gated(mg, refuses)
                for name in found:
                    both = standardise(mg) + standardise(np.array([r[name] for r in rows]))
                    scores[f"margin+{name}|gated"] = gated(both, refuses)
        names += [n for n in scores if n not in names]
        mixes.append((path.stem, np.array([r["flag"] for r in rows]), scores))
    return signal_table(mixes, names, [n.replace("|", "\\|") for n in names], keep)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_mix_arguments(p)
    p.add_argument("--pairs", default="../shared/data/safe/hh_rlhf_harmless_base_test.jsonl.gz")
    p.add_argument("--pairs-sample", type=int, default=100)
    p.add_argument("--pairs-max-length", type=int, default=384)
    p.add_argument("--model", default="Qwen/Qwen2.5-Coder-0.5B-Instruct")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--modules", default="q_proj,v_proj,o_proj,down_proj")
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--layers", default="12,20", help="hidden-state layers for `act`")
    p.add_argument("--windows", default="8,32,0", help="answer tokens scored (0 = all)")
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/contrast_probe")
    p.add_argument("--margins", default="runs/judge_probe",
                   help="judge_probe's saved rows, for the margin and the sums")
    p.add_argument("--table", action="store_true", help="print the saved rows' table and exit")
    a = p.parse_args()
    out = Path(a.out)
    if a.table:
        print(table(out, Path(a.margins)))
        return
    torch.set_num_threads(a.threads)
    out.mkdir(parents=True, exist_ok=True)
    layers = [int(x) for x in a.layers.split(",") if x]
    windows = [int(x) for x in a.windows.split(",")]
    model, tokenizer, params = lora_model(a.model, a.rank, a.modules.split(","), seed=0)
    t0 = time.time()
    pairs = pairs_from_rows(read_rows(a.pairs), a.pairs)
    pairs = [pairs[i] for i in np.random.default_rng(0).permutation(len(pairs))[:a.pairs_sample]]
    direction, act, used = contrast_direction(model, params, tokenizer, pairs,
                                              a.pairs_max_length, layers, a.micro)
    print(f"contrast: {used} pairs, {time.time() - t0:.0f}s", flush=True)
    rows_per_mix(out, a, lambda examples: row_scores(
        model, params, direction, act, tokenizer, examples, a.max_length, windows, a.micro))
    print(table(out, Path(a.margins)))


if __name__ == "__main__":
    main()
