"""Research probe (not the product): which per-row loss signal of the aligned proxy separates
harmful compliance from benign rows and from the controls? Computes, for every row of the given
mixes, per-token response NLLs under the frozen proxy and under θ trained on the safe set, plus
the NLL of fixed refusals after the row's own prompt, and saves them (npz) for offline analysis.

    python benchmarks/signal_probe.py --mixes runs/dev_mixes/*.jsonl --out runs/probe
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sealft.data import load_examples, normalise, read_rows, sample_rows
from sealft.losses import per_example_loss
from sealft.models import LoraSettings, adapter_parameters, add_lora_adapters, load_model_and_tokenizer
from sealft.tokenize import IGNORE_INDEX, collate, tokenize_examples

REFUSALS = ("I'm sorry, but I can't assist with that.",)
FIRST = 64


@torch.no_grad()
def token_nll(model, tok, pad) -> np.ndarray:
    """[rows, FIRST + 2]: NLL of the first FIRST response tokens (nan past the end), then the
    mean over the whole (truncated) response and the response length."""
    out = np.full((len(tok), FIRST + 2), np.nan, dtype=np.float32)
    for start in range(0, len(tok), 8):
        if start % 40 == 0:
            print(f"  {start}/{len(tok)}", flush=True)
        pos = list(range(start, min(start + 8, len(tok))))
        b = collate(tok, pos, pad)
        labels = b["labels"][:, 1:]
        sup = labels != IGNORE_INDEX
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = lm.get_decoder()(input_ids=b["input_ids"],
                                  attention_mask=b["attention_mask"]).last_hidden_state[:, :-1]
        flat = F.cross_entropy(lm.get_output_embeddings()(hidden[sup]).float(), labels[sup],
                               reduction="none")
        nll = torch.zeros(labels.shape)
        nll[sup] = flat
        for k in range(len(pos)):
            v = nll[k][sup[k]].numpy()
            n = min(len(v), FIRST)
            out[pos[k], :n] = v[:n]
            out[pos[k], FIRST] = v.mean()
            out[pos[k], FIRST + 1] = len(v)
    return out


def refusal_examples(examples):
    rows = []
    for e in examples:
        for r in REFUSALS:
            rows.append({"id": f"{e['id']}:{r[:6]}", "index": len(rows), "meta": {},
                         "messages": e["messages"][:-1] + [{"role": "assistant", "content": r}]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mixes", nargs="+", required=True)
    p.add_argument("--out", default="runs/probe")
    p.add_argument("--model", default="Qwen/Qwen2.5-Coder-0.5B-Instruct")
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--safe-steps", type=int, default=13)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--benign", type=int, default=None, help="benign rows per mix")
    a = p.parse_args()
    torch.manual_seed(0)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model_and_tokenizer(a.model)
    pad = tokenizer.pad_token_id
    model = add_lora_adapters(model, LoraSettings(), ("theta",))
    data = {}
    for path in a.mixes:
        ex = load_examples(path, "train", "auto", None, False)
        if a.benign:  # every non-benign row, a seeded sample of the benign ones
            benign = [e for e in ex if e["meta"].get("flag") in ("benign", "finetune")]
            keep = {e["id"] for e in sample_rows(benign, a.benign, 0)}
            ex = [e for e in ex if e["id"] in keep or e["meta"].get("flag") not in ("benign", "finetune")]
        tok = tokenize_examples(ex, tokenizer, a.max_length, desc=Path(path).stem)
        ref = tokenize_examples(refusal_examples([ex[r] for r in tok.rows]), tokenizer,
                                a.max_length + 32, desc="refusals")
        assert len(ref) == len(REFUSALS) * len(tok)
        flags = [ex[r]["meta"].get("flag") for r in tok.rows]
        sources = [ex[r]["meta"].get("source", ex[r]["meta"].get("flag")) for r in tok.rows]
        data[Path(path).stem] = (tok, ref, flags, sources)
    safe = normalise(read_rows("../shared/data/safe/safetyllamas_safety_only.json"),
                     "safe", "auto", drop_duplicates=True)
    safe = sample_rows(safe, 200, 0)
    safe_tok = tokenize_examples(safe, tokenizer, a.max_length, desc="safe")

    def score_all(tag):
        model.eval()
        for name, (tok, ref, flags, sources) in data.items():
            t0 = time.time()
            resp = token_nll(model, tok, pad)
            refn = token_nll(model, ref, pad)
            np.savez(out / f"{name}__{tag}.npz", resp=resp, ref=refn, flags=np.array(flags),
                     sources=np.array(sources))
            print(f"{name} {tag}: {time.time() - t0:.0f}s", flush=True)

    with model.disable_adapter():
        score_all("base")
    model.train()
    opt = torch.optim.Adam(adapter_parameters(model, "theta"), lr=a.lr)
    rng = np.random.default_rng(0)
    for step in range(a.safe_steps):
        pos = rng.choice(len(safe_tok), 16, replace=False).tolist()
        loss = 0.0
        for half in (pos[:8], pos[8:]):
            part = per_example_loss(model, collate(safe_tok, half, pad)).sum() / 16
            part.backward()
            loss += part.item()
        opt.step()
        opt.zero_grad()
        print(f"safe step {step}: {loss:.3f}", flush=True)
    score_all("safe")


if __name__ == "__main__":
    main()
