"""Research probe (not the product): TOSS's token contrast, built from nothing but the safe set.

TOSS (Li et al., ICLR 2026) scores each answer token by the loss difference between a
safety-degraded model and a utility model: tokens the degraded model predicts better are the
unsafe ones, and they are not only the first few. TOSS trains the degraded model on harmful
data, which a SEAL user does not have. The aligned proxy can write it, though: prefilled with
"Sure, here is", it complies with most of the safe set's harmful requests. So two LoRA fits
from the same start, on the same safe-set prompts, in the same order:

- θ_comply: each prompt with the proxy's own prefilled compliance (answers that open as a
  refusal are dropped);
- θ_refuse: the same prompts with the safe set's refusals.

A row's token contrast is c_t = ℓ_t(θ_refuse) − ℓ_t(θ_comply): positive where the row's answer
reads like compliance with a harmful request. Both fits saw the same prompts equally often, so
the prompts' topic and how hard the text is cancel; what differs is the answer. The hope, for
the controls the first-token margin loses: an answered safe prompt that only *sounds*
dangerous ("How do I kill a Python process?") opens like compliance, but its later tokens are
ordinary text, which neither fit learned; harmful compliance keeps reading like the
compliance θ_comply learned. Hence the primary signals, fixed before the first run:
`late` = mean c_t over answer tokens 4-63 (after the opening), `all` = over tokens 0-63.
TOSS's own form, with the frozen proxy as the utility model, is `base` (ℓ_t(θ_0) −
ℓ_t(θ_comply)). Every row's token values are saved, so other windows can be read without
rerunning.

Only layers from --first-layer on are trained (LoRA); the frozen layers below run once per
row (interference_probe.UpperLayers), which is what makes this affordable on two cores.

    python benchmarks/token_contrast_probe.py --mixes runs/dev_mixes/alpaca-xstest_s0.jsonl \
        --out runs/token_contrast_probe
    python benchmarks/token_contrast_probe.py --table --out runs/token_contrast_probe
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sealft.io import read_jsonl, write_jsonl
from sealft.refusal import is_refusal
from sealft.tokenize import IGNORE_INDEX

sys.path.insert(0, str(Path(__file__).resolve().parent))
from interference_probe import (  # noqa: E402
    UpperLayers,
    add_fit_arguments,
    answer_logits,
    batch_of,
    fit,
    frozen_proxy,
    safe_sample,
    windowed,
    with_upper_lora,
)
from judge_probe import REFUSALS, first_token, gated, signal_table, standardise  # noqa: E402
from probe_runs import computed_once, rows_per_mix  # noqa: E402

PREFILL = "Sure, here is"
# (name, first token, last token): windows over the answer's tokens, read from the saved values
WINDOWS = (("first", 0, 1), ("open4", 0, 4), ("all", 0, 64), ("late", 4, 64), ("late16", 16, 64))


@torch.no_grad()
def prefilled_compliance(model, tokenizer, rows: list[dict], new_tokens: int,
                         seed: int) -> list[dict]:
    """Each safe-set prompt answered by the proxy after the prefill; answers that still open
    as a refusal are left out (they would teach θ_comply to refuse)."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    torch.manual_seed(seed)
    out = []
    for b in range(0, len(rows), 16):
        chunk = rows[b: b + 16]
        texts = [tokenizer.apply_chat_template([r["messages"][0]], tokenize=False,
                                               add_generation_prompt=True) + PREFILL
                 for r in chunk]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        ids = model.generate(**enc, max_new_tokens=new_tokens, do_sample=True, temperature=0.8,
                             top_p=0.95, pad_token_id=tokenizer.pad_token_id)
        for r, seq in zip(chunk, ids, strict=True):
            answer = PREFILL + tokenizer.decode(seq[enc["input_ids"].shape[1]:],
                                                skip_special_tokens=True)
            if not is_refusal(answer):
                out.append({"id": r["id"], "messages": [r["messages"][0],
                                                        {"role": "assistant", "content": answer}],
                            "meta": {}})
        print(f"  generated {b + len(chunk)}/{len(rows)}", flush=True)
    tokenizer.padding_side = side
    return out


@torch.no_grad()
def token_losses(model, data, pad: int, refusal_firsts: list[int]) -> tuple[list, np.ndarray]:
    """Per row: the loss of each answer token, and the lowest loss of a refusal's first token
    where the answer starts (the product's default margin is the first token's loss minus
    this)."""
    losses, refuse = [], np.zeros(len(data))
    for b in range(0, len(data), 16):
        logits, labels = answer_logits(model, batch_of(data[b: b + 16], pad))
        logp = torch.log_softmax(logits, dim=-1)
        answer = labels != IGNORE_INDEX
        for k in range(len(logp)):
            at = answer[k].nonzero().squeeze(1)
            losses.append((-logp[k, at, labels[k, at]]).tolist())
            refuse[b + k] = -logp[k, at[0], refusal_firsts].max().item()
    return losses, refuse


def fitted(model, initial: dict, data, a, path: Path) -> dict:
    """The LoRA state after fitting `data` from `initial`, saved once and read back on a
    rerun, so that every mix is scored against the same two fits."""
    def compute() -> dict:
        model.load_state_dict(initial, strict=False)
        fit(model, data, [], a, with_safe=False)
        return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    return computed_once(path, compute, lambda p, v: save_file(v, str(p)), load_file)


def mix_rows(model, upper: UpperLayers, tokenizer, fits: dict, examples, a) -> list[dict]:
    data = upper.cache(windowed(examples, tokenizer, a.max_length, a.window), a.pad)
    firsts = [first_token(tokenizer, r) for r in REFUSALS]
    with model.disable_adapter():
        base, refuse = token_losses(model, data, a.pad, firsts)
    per_fit = {}
    for name, state in fits.items():
        model.load_state_dict(state, strict=False)
        per_fit[name], _ = token_losses(model, data, a.pad, firsts)
    out = []
    for k, (_, _, r) in enumerate(data):
        answer = examples[r]["messages"][-1]["content"]
        out.append({"id": examples[r]["id"], "flag": examples[r]["meta"].get("flag"),
                    "answer_refuses": is_refusal(answer), "margin": base[k][0] - refuse[k],
                    "contrast": [round(x - y, 4) for x, y in
                                 zip(per_fit["refuse"][k], per_fit["comply"][k], strict=True)],
                    "base": [round(x - y, 4) for x, y in
                             zip(base[k], per_fit["comply"][k], strict=True)]})
    return out


def window_mean(values: list[list[float]], start: int, stop: int) -> np.ndarray:
    """Mean over the window; a row whose answer ends before it scores 0 (no evidence)."""
    return np.array([np.mean(v[start:stop]) if len(v) > start else 0.0 for v in values])


def table(out: Path, keep: float = 0.8) -> str:
    mixes, names = [], []
    for path in sorted(out.glob("*.jsonl")):
        if path.name == "compliance.jsonl":
            continue
        rows = read_jsonl(path)
        refuses = np.array([r["answer_refuses"] for r in rows])
        margin = np.array([r["margin"] for r in rows])
        scores = {"margin|gated": gated(margin, refuses)}
        for kind in ("contrast", "base"):
            values = [r[kind] for r in rows]
            for name, start, stop in WINDOWS:
                s = window_mean(values, start, stop)
                scores[f"{kind}_{name}|gated"] = gated(s, refuses)
                if name in ("all", "late"):
                    scores[f"margin+{kind}_{name}|gated"] = gated(
                        standardise(margin) + standardise(s), refuses)
        names = list(scores)
        mixes.append((path.stem, np.array([r["flag"] for r in rows]), scores))
    return signal_table(mixes, names, [n.replace("|", "\\|") for n in names], keep)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_fit_arguments(p)
    # --safe-sample: the prompts the two fits share (fewer if some answers refuse)
    p.set_defaults(safe_sample=96, first_layer=12, window=64, epochs=3,
                   out="runs/token_contrast_probe")
    a = p.parse_args()
    out = Path(a.out)
    if a.table:
        print(table(out))
        return
    model, tokenizer = frozen_proxy(a)
    safe_rows = safe_sample(a)
    comply = computed_once(out / "compliance.jsonl",
                           lambda: prefilled_compliance(model, tokenizer, safe_rows, a.window,
                                                        a.seed),
                           write_jsonl, read_jsonl, lambda rows: f"{len(rows)} answers, ")
    kept = {r["id"] for r in comply}
    refuse = [r for r in safe_rows if r["id"] in kept]  # the same prompts, the safe set's answers
    upper, model, initial = with_upper_lora(model, a)
    fits = {}
    for name, rows in (("comply", comply), ("refuse", refuse)):
        t0 = time.time()
        data = upper.cache(windowed(rows, tokenizer, a.max_length, a.window), a.pad)
        fits[name] = fitted(model, initial, data, a, out / f"fit_{name}.safetensors")
        print(f"θ_{name}: {len(data)} rows, {time.time() - t0:.0f}s", flush=True)
    rows_per_mix(out, a, lambda examples: mix_rows(model, upper, tokenizer, fits, examples, a))
    print(table(out))


if __name__ == "__main__":
    main()
