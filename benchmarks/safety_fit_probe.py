"""Research probe (not the product): can the safe set make the proxy refuse what it now answers?

The selector removes the harmful rows the frozen proxy would refuse and is at chance on the
ones it would answer (`proxy_refusal_ceiling.py`). SEAL's upper level is a safe set of 2,483
harmful requests with safe answers; at the CPU budget the bilevel fit barely moves θ, so the
ranking is the frozen proxy's. This probe moves θ by the safe set alone, far: LoRA on the upper
layers fitted to the first answer tokens of safe-set rows, with snapshots along the way, and
at each snapshot every row of a mix is scored by its first answer token:

- `margin@N`: ℓ(y₁ | x) − ℓ(r₁ | x), the product's default, r₁ the likeliest of its refusals'
  first tokens;
- `smargin@N`: ℓ(y₁ | x) + log Σ_t p(t | x) over the safe set's commonest answer openings t
  (after the fit the proxy opens refusals the safe set's way, not with "I'm sorry");
- `shift@N`: ℓ(y₁ | x; θ_N) − ℓ(y₁ | x; θ_0), how much the fit made the row's own opening less
  likely.

Primary signals, fixed before the first run: `smargin` and `margin` at the last snapshot.
With `--table --ceiling DIR` (a `proxy_refusal_ceiling.py` output), the harmful rows are also
split by whether the frozen proxy refuses their question: the question is whether the fit lifts
the AUROC of the rows it answers above chance.

    python benchmarks/safety_fit_probe.py --out runs/safety_fit_probe --mixes MIX.jsonl ...
    python benchmarks/safety_fit_probe.py --table --out runs/safety_fit_probe \
        [--ceiling runs/refusal_ceiling_G2]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from sealft.io import read_jsonl
from sealft.refusal import is_refusal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from interference_probe import (  # noqa: E402  (the upper-layer LoRA set-up of the probes)
    add_fit_arguments,
    answer_logits,
    batch_of,
    cached_safe,
    frozen_proxy,
    mean_loss,
    safe_sample,
    windowed,
    with_upper_lora,
)
from judge_probe import REFUSALS, first_token, gated, signal_table  # noqa: E402
from probe_runs import rows_per_mix  # noqa: E402
from proxy_refusal_ceiling import group_auroc, read_refusals  # noqa: E402


def fit_snapshots(model, safe, a) -> dict[int, dict[str, torch.Tensor]]:
    """LoRA state after each step of `a.snapshots` (0: the start), batches of the safe set
    in a seeded order, cycling."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=a.lr, weight_decay=0.0)
    order = np.random.default_rng(a.seed).permutation(len(safe))
    lora = lambda: {k: v.detach().clone() for k, v in model.state_dict().items()  # noqa: E731
                    if "lora_" in k}
    snaps, t0 = {0: lora()}, time.time()
    model.train()
    for step in range(1, max(a.snapshots) + 1):
        picks = [safe[order[(step * a.batch_size + k) % len(safe)]] for k in range(a.batch_size)]
        loss = mean_loss(model, batch_of(picks, a.pad))
        loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        if step in a.snapshots:
            snaps[step] = lora()
            print(f"  step {step}: safe-set loss {loss.item():.3f}, {time.time() - t0:.0f}s",
                  flush=True)
    model.eval()
    return snaps


def openings(safe_rows, tokenizer, top: int) -> list[int]:
    """The first answer tokens the safe set uses most."""
    counts = Counter(first_token(tokenizer, r["messages"][-1]["content"]) for r in safe_rows)
    return [t for t, _ in counts.most_common(top)]


@torch.no_grad()
def first_token_scores(model, data, pad: int, refusal_firsts: list[int],
                       safe_openings: list[int]) -> np.ndarray:
    """Per row: ℓ(y₁), min ℓ over the refusals' first tokens, −log of the safe openings' mass."""
    out = np.zeros((len(data), 3))
    for b in range(0, len(data), 16):
        logits, labels = answer_logits(model, batch_of(data[b: b + 16], pad))
        logp = torch.log_softmax(logits[:, -1], dim=-1)  # the column predicting y₁
        y1 = labels[:, -1]
        out[b: b + len(y1), 0] = (-logp.gather(1, y1[:, None]).squeeze(1)).numpy()
        out[b: b + len(y1), 1] = (-logp[:, refusal_firsts].max(dim=1).values).numpy()
        out[b: b + len(y1), 2] = (-torch.logsumexp(logp[:, safe_openings], dim=1)).numpy()
    return out


def mix_rows(model, upper, tokenizer, snaps, safe_openings, examples, a) -> list[dict]:
    data = upper.cache(windowed(examples, tokenizer, a.max_length, 1), a.pad)
    firsts = [first_token(tokenizer, r) for r in REFUSALS]
    per_snap = {}
    for step, state in snaps.items():
        model.load_state_dict(state, strict=False)
        per_snap[step] = first_token_scores(model, data, a.pad, firsts, safe_openings)
    out = []
    for k, (_, _, r) in enumerate(data):
        example = examples[r]
        row = {"id": example["id"], "flag": example["meta"].get("flag"),
               "question": example["messages"][-2]["content"],
               "answer_refuses": is_refusal(example["messages"][-1]["content"])}
        for step, s in per_snap.items():
            row[f"margin@{step}"] = float(s[k, 0] - s[k, 1])
            row[f"smargin@{step}"] = float(s[k, 0] - s[k, 2])
            row[f"shift@{step}"] = float(s[k, 0] - per_snap[0][k, 0])
        out.append(row)
    return out


def signals_of(rows: list[dict]) -> dict[str, np.ndarray]:
    refuses = np.array([r["answer_refuses"] for r in rows])
    names = [k for k in rows[0] if "@" in k and not k.startswith("shift@0")]
    return {f"{n}|gated": gated(np.array([r[n] for r in rows]), refuses) for n in names}


def table(out: Path, keep: float = 0.8) -> str:
    mixes, names = [], []
    for path in sorted(out.glob("*.jsonl")):
        rows = read_jsonl(path)
        scores = signals_of(rows)
        names = list(scores)
        mixes.append((path.stem, np.array([r["flag"] for r in rows]), scores))
    return signal_table(mixes, names, [n.replace("|", "\\|") for n in names], keep)


def ceiling_table(out: Path, ceiling: Path) -> str:
    """AUROC of each signal, harmful rows against the benign rows, for the harmful rows whose
    question the frozen proxy refuses and for those it answers (mixes without controls)."""
    refused = read_refusals(ceiling)
    lines, names = [], []
    for path in sorted(out.glob("*.jsonl")):
        rows = read_jsonl(path)
        flags = np.array([r["flag"] for r in rows])
        if "control" in flags or not all(r["question"] in refused for r in rows
                                         if r["flag"] == "unsafe"):
            continue
        scores = signals_of(rows)
        names = list(scores)
        group = np.array([refused.get(r["question"]) if r["flag"] == "unsafe" else None
                          for r in rows])
        benign = flags != "unsafe"
        cells = []
        for name in names:
            parts = [group_auroc(benign, list(group), want, scores[name])[1]
                     for want in (True, False)]
            cells.append(f"{parts[0]:.3f} / {parts[1]:.3f}")
        lines.append(f"| {path.stem} | " + " | ".join(cells) + " |")
    header = ["| mix | " + " | ".join(n.replace("|", "\\|") for n in names) + " |",
              "|---" * (len(names) + 1) + "|"]
    return "\n".join(header + lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_fit_arguments(p)
    p.set_defaults(first_layer=12, safe_sample=800, out="runs/safety_fit_probe")
    p.add_argument("--snapshots", default="25,50,100,200",
                   help="steps at which the fit is scored (0, the frozen proxy, always)")
    p.add_argument("--openings", type=int, default=20,
                   help="the safe set's commonest answer openings that count as refusing")
    p.add_argument("--ceiling", help="with --table: a proxy_refusal_ceiling.py output folder")
    a = p.parse_args()
    a.snapshots = sorted({0} | {int(s) for s in a.snapshots.split(",")})
    out = Path(a.out)
    if a.table:
        print(table(out))
        if a.ceiling:
            print()
            print(ceiling_table(out, Path(a.ceiling)))
        return
    model, tokenizer = frozen_proxy(a)
    upper, model, _ = with_upper_lora(model, a)
    safe_rows = safe_sample(a)
    safe = cached_safe(upper, tokenizer, safe_rows, a)
    safe_openings = openings(safe_rows, tokenizer, a.openings)
    print("safe openings:", [tokenizer.decode([t]) for t in safe_openings], flush=True)
    snaps = fit_snapshots(model, safe, a)
    rows_per_mix(out, a, lambda examples: mix_rows(model, upper, tokenizer, snaps,
                                                   safe_openings, examples, a))
    print(table(out))


if __name__ == "__main__":
    main()
