"""Research probe (not the product): SEAL's own question asked of every row at one θ — would a
gradient step on this row raise or lower the safe set's loss?

Up-weighting row i moves the upper-level (safe-set) loss by about −η ⟨∇ℓ_safe(θ), ∇ℓ_i(θ)⟩
to first order: the hypergradient Algorithm 2's selector follows, here taken at the same θ
for every row rather than at the θ its batch happened to meet. A row that teaches compliance
with harmful requests should pull against the safe set's refusals; a benign row should be
nearly orthogonal to them; a refusal should pull with them. Unlike the first-token margin, the
answer's content enters (its whole gradient), so a safe prompt that sounds dangerous is judged
by what its answer teaches rather than by how the prompt sounds.

Gradients are those of LoRA B matrices at initialisation (A random, B zero): ∇B is the full
weight gradient seen through A, a random projection (as LESS, Xia et al. 2024, does with
LoRA gradients). One backward per row and loss, stored, so that every variant is computed
from the saved vectors:

- losses (`--losses`): `whole` (mean over the response, up to --max-length) and `firstK`
  (the first K response tokens, where compliance or refusal is decided);
- scores (higher → harmful): `dot` = −⟨g_i, ḡ_safe⟩, `cos` = its cosine, `cos_c` = the cosine
  after subtracting the mix's mean gradient from both (what every row teaches alike — the chat
  format, the assistant's register — is not evidence either way);
- every score also `|gated`: rows whose answer is a refusal (sealft.refusal) rank lowest.

    python benchmarks/gradient_probe.py --mixes runs/dev_mixes/*.jsonl \
        --sst2 ../shared/data/finetune/sst2_n1000_p0.{05,1,2}.json --out runs/gradient_probe
    python benchmarks/gradient_probe.py --table --out runs/gradient_probe
"""

from __future__ import annotations

import argparse
import json
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
from sealft.tokenize import IGNORE_INDEX, collate, tokenize_examples

sys.path.insert(0, str(Path(__file__).resolve().parent))
from judge_probe import gated, signal_table  # noqa: E402  (one table for both probes)
from probe_runs import add_mix_arguments, rows_per_mix  # noqa: E402

SCORES = ("dot", "cos", "cos_c")


def lora_model(name: str, rank: int, modules: list[str], seed: int):
    model, tokenizer = load_model_and_tokenizer(name)
    torch.manual_seed(seed)  # A is the random projection: fixed, so mixes share it
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                                             target_modules=modules))
    params = []
    for n, p in model.named_parameters():
        p.requires_grad_("lora_B" in n)  # ∇A is zero while B is zero; skip computing it
        if "lora_B" in n:
            params.append(p)
    model.eval()
    return model, tokenizer, params


def row_gradients(model, params, batch: dict, losses: list[str]) -> dict[str, np.ndarray]:
    """∇B of each named loss (`whole`, `firstK`) for one row."""
    out = {}
    labels = batch["labels"]
    start = int((labels[0] != IGNORE_INDEX).nonzero()[0])
    for loss_name in losses:
        if loss_name.startswith("first"):  # later answer tokens cannot change these losses
            end = min(start + int(loss_name[5:]), labels.shape[1])
            ids, lab = batch["input_ids"][:, :end], labels[:, :end]
        else:
            ids, lab = batch["input_ids"], labels
        logits = model(input_ids=ids).logits[0, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits, lab[0, 1:], ignore_index=IGNORE_INDEX)
        grads = torch.autograd.grad(loss, params)
        out[loss_name] = torch.cat([g.reshape(-1) for g in grads]).numpy().astype(np.float32)
    return out


def gradients(model, tokenizer, params, examples, max_length: int, losses: list[str]):
    """Per usable row: its input position and one gradient vector per loss."""
    tokenized = tokenize_examples(examples, tokenizer, max_length, cache=False)
    pad = tokenizer.pad_token_id or 0
    rows, grads = [], {k: [] for k in losses}
    for position in range(len(tokenized)):
        g = row_gradients(model, params, collate(tokenized, [position], pad), losses)
        for k in losses:
            grads[k].append(g[k])
        rows.append(int(tokenized.rows[position]))
    return rows, {k: np.stack(v) for k, v in grads.items()}


def scores(grads: np.ndarray, safe_mean: np.ndarray) -> dict[str, np.ndarray]:
    unit = lambda x: x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)  # noqa: E731
    centre = grads.mean(axis=0)
    return {"dot": -(grads @ safe_mean),
            "cos": -(unit(grads) @ unit(safe_mean)),
            "cos_c": -(unit(grads - centre) @ unit(safe_mean - centre))}


def mix_rows(model, tokenizer, params, examples, safe_means, a) -> list[dict]:
    rows, grads = gradients(model, tokenizer, params, examples, a.max_length, a.losses)
    out = [{"id": examples[r]["id"], "flag": examples[r]["meta"].get("flag"),
            "answer_refuses": is_refusal(examples[r]["messages"][-1]["content"])} for r in rows]
    for loss_name in a.losses:
        for score_name, values in scores(grads[loss_name], safe_means[loss_name]).items():
            for row, v in zip(out, values, strict=True):
                row[f"{loss_name}_{score_name}"] = float(v)
    return out


def table(out: Path, keep: float = 0.8) -> str:
    paths = sorted(out.glob("*.jsonl"))
    found = sorted({k for p in paths for k in json.loads(p.read_text().splitlines()[0])
                    if k.endswith(SCORES)}, key=lambda k: (k.split("_")[0], k))
    names = [f"{n}{g}" for n in found for g in ("", "|gated")]
    mixes = []
    for path in paths:
        rows = read_jsonl(path)
        refuses = np.array([r["answer_refuses"] for r in rows])
        scores = {}
        for name in found:
            if name in rows[0]:
                raw = np.array([r[name] for r in rows])
                scores[name], scores[f"{name}|gated"] = raw, gated(raw, refuses)
        mixes.append((path.stem, np.array([r["flag"] for r in rows]), scores))
    return signal_table(mixes, names, [n.replace("|", "\\|") for n in names], keep)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_mix_arguments(p)
    p.add_argument("--safe-data", default="../shared/data/safe/safetyllamas_safety_only.json")
    p.add_argument("--safe-sample", type=int, default=100)
    p.add_argument("--model", default="Qwen/Qwen2.5-Coder-0.5B-Instruct")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--modules", default="q_proj,v_proj,o_proj,down_proj")
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--losses", default="first1,first4",
                   help="comma-separated: whole (the response up to --max-length), firstK "
                        "(its first K tokens)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/gradient_probe")
    p.add_argument("--table", action="store_true", help="print the saved rows' table and exit")
    a = p.parse_args()
    a.losses = a.losses.split(",")
    out = Path(a.out)
    if a.table:
        print(table(out))
        return
    torch.set_num_threads(a.threads)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, params = lora_model(a.model, a.rank, a.modules.split(","), seed=0)
    t0 = time.time()
    safe = sample_rows(load_examples(a.safe_data, "train", "auto", None, False), a.safe_sample, 0)
    _, safe_grads = gradients(model, tokenizer, params, safe, a.max_length, a.losses)
    safe_means = {k: v.mean(axis=0) for k, v in safe_grads.items()}
    print(f"safe set: {len(safe)} rows, {time.time() - t0:.0f}s", flush=True)
    rows_per_mix(out, a, lambda examples: mix_rows(model, tokenizer, params, examples,
                                                   safe_means, a))
    print(table(out))


if __name__ == "__main__":
    main()
