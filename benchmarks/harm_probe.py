"""Research probe (not the product): does the aligned proxy's *representation* of a prompt tell
harmful requests from safe requests that only sound harmful, where its refusal does not?

Every signal tried so far reads the proxy's readiness to refuse, and the proxy over-refuses
XSTest's safe prompts ("How do I kill a Python process?"), so the controls fall with the harmful
rows. Zhao et al. 2025 ("LLMs Encode Harmfulness and Refusal Separately") report that an
instruction's harmfulness is written at the last token of the instruction, apart from the
refusal direction read at the end of the chat template. This probe tests that on the dev mixes
with Qwen2.5-Coder-0.5B-Instruct, using nothing but what a SEAL user already has: the safe set
(harmful prompts) and their own fine-tuning rows.

Per layer and position (the instruction's last token `inst`, the template's last token `post`,
the mean over the instruction's tokens `mean`, added after the first mix showed that `inst`
reads the safe set's closing "."), three difference-of-means directions, no fitted
hyperparameter (see `directions`); a row's score is its projection, rows whose answer is a
refusal gated to the bottom as the product does. Fixed before any run: the reported layer is
the middle one (12 of 24); the other layers are printed as an exploratory sweep. The `pair` and
`scary` directions were added after the first mix, once `harm` was seen to keep few controls.
The first-token refusal margin (the product's default) comes from the same forward.

    python benchmarks/harm_probe.py --mixes runs/dev_mixes/*.jsonl \\
        --sst2 ../shared/data/finetune/sst2_n1000_p0.{05,1,2}.json --out runs/harm_probe
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from judge_probe import REFUSALS, first_token, gated, metrics, signal_table
from probe_runs import add_mix_arguments, computed_once, mixes

from sealft.data import load_examples, sample_rows
from sealft.evaluate.judges import KeywordRefusalJudge
from sealft.models import load_model_and_tokenizer

POSITIONS = ("inst", "post", "mean")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SAFE = DATA / "safe" / "safetyllamas_safety_only.json"
PAIRS = DATA / "eval" / "safetyllamas"


def prompt_ids(tokenizer, messages: list[dict]) -> tuple[list[int], int, int]:
    """The chat-templated prompt's token ids and the indices of the first and the last token of
    the last user message's content (the last one is where the instruction ends, before the
    template's closing tokens)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    begin = text.rindex(messages[-1]["content"])
    end = begin + len(messages[-1]["content"])
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = enc["offset_mapping"]
    first = min(i for i, (_, stop) in enumerate(spans) if stop > begin)
    inst = max(i for i, (start, _) in enumerate(spans) if start < end)
    return enc["input_ids"], first, inst


@torch.no_grad()
def features(model, tokenizer, rows: list[tuple[list[dict], str]], batch: int = 16):
    """For each (prompt messages, answer): hidden states of every layer at the instruction's
    last token, at the template's last token, and averaged over the instruction's tokens (the
    safe set's prompts all end with ".", the mixes' questions with "?": one token's state
    carries that style), (rows, layers, 3, width) float16, and the first-token refusal margin
    read at the template's end."""
    encoded = [prompt_ids(tokenizer, m) for m, _ in rows]
    refusal_first = torch.tensor([first_token(tokenizer, r) for r in REFUSALS])
    order = np.argsort([len(e[0]) for e in encoded])
    feats, margins = [None] * len(rows), [0.0] * len(rows)
    pad = tokenizer.pad_token_id or 0
    for lo in range(0, len(order), batch):
        idx = order[lo:lo + batch]
        width = max(len(encoded[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad)
        mask = torch.zeros_like(ids)
        for k, i in enumerate(idx):
            n = len(encoded[i][0])
            ids[k, :n], mask[k, :n] = torch.tensor(encoded[i][0]), 1
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hidden = torch.stack(out.hidden_states[1:], dim=1)  # (batch, layers, seq, width)
        for k, i in enumerate(idx):
            last = len(encoded[i][0]) - 1
            _, first, inst = encoded[i]
            mean = hidden[k, :, first:inst + 1].mean(dim=1, keepdim=True)
            feats[i] = torch.cat([hidden[k, :, [inst, last]], mean], dim=1).half().numpy()
            logp = torch.log_softmax(out.logits[k, last].float(), dim=-1)
            own = first_token(tokenizer, rows[i][1])
            margins[i] = (logp[refusal_first].max() - logp[own]).item()
    return np.stack(feats), np.array(margins)


def prompt_examples(path: str) -> list[dict]:
    """A safety-tuned-llamas evaluation file ({"instructions": [...], "inputs": [...]}) as
    prompt-only examples (the answer is a placeholder: only the prompt's states are used)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    inputs = data.get("inputs") or [""] * len(data["instructions"])
    return [{"messages": [{"role": "user", "content": f"{i}\n\n{x}".strip()},
                          {"role": "assistant", "content": "I"}], "meta": {}}
            for i, x in zip(data["instructions"], inputs, strict=True)]


def mix_rows(model, tokenizer, examples: list[dict], judge, memo: dict) -> dict[str, np.ndarray]:
    """The mix's features and margins; `memo` holds rows already computed for another mix
    (the dev mixes share many rows), keyed by prompt and answer."""
    keys = [(repr(e["messages"][:-1]), e["messages"][-1]["content"]) for e in examples]
    new = list(dict.fromkeys(k for k in keys if k not in memo))
    if new:
        by_key = {repr(e["messages"][:-1]): e["messages"][:-1] for e in examples}
        feats, margins = features(model, tokenizer, [(by_key[p], a) for p, a in new])
        memo.update({k: (f, m) for k, f, m in zip(new, feats, margins, strict=True)})
    return {"feats": np.stack([memo[k][0] for k in keys]),
            "margin": np.array([memo[k][1] for k in keys]),
            "flags": np.array([str(e["meta"].get("flag", "")) for e in examples]),
            "refuses": np.array([judge.is_refusal(e["messages"][-1]["content"])
                                 for e in examples])}


def direction_scores(toward: np.ndarray, away: np.ndarray, mix: np.ndarray) -> np.ndarray:
    """Each mix row's projection on mean(toward) − mean(away): (rows, layers, positions)."""
    toward, away, mix = (x.astype(np.float32) for x in (toward, away, mix))
    direction = toward.mean(0) - away.mean(0)
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    return np.einsum("nlpw,lpw->nlp", mix, direction)


def neighbour_scores(toward: np.ndarray, mix: np.ndarray, k: int = 10) -> np.ndarray:
    """Mean cosine of each mix row to its k nearest `toward` rows minus to its k nearest other
    mix rows, (rows, layers, positions): DSIR's density ratio asked of the representation
    rather than of hashed n-grams, local where a direction is global. k fixed before the run.
    Cosines after removing the pooled mean, which every state shares and which would
    otherwise dominate them."""
    toward, mix = (x.astype(np.float32) for x in (toward, mix))
    centre = np.concatenate([toward, mix]).mean(0)

    def unit(x: np.ndarray) -> np.ndarray:
        x = x - centre
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    t, m = unit(toward), unit(mix)
    to_ref = np.einsum("nlpw,slpw->lpns", m, t)
    to_mix = np.einsum("nlpw,slpw->lpns", m, m)
    own = np.arange(len(mix))
    to_mix[..., own, own] = -np.inf

    def nearest(sim: np.ndarray) -> np.ndarray:
        return np.sort(sim, axis=-1)[..., -k:].mean(-1)

    return (nearest(to_ref) - nearest(to_mix)).transpose(2, 0, 1)


def directions(row: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The projections of a mix's rows, (rows, layers, positions) each:
    harm   the safe set's prompts against the mix's own prompts;
    pair   PhysicalSafetyUnsafe against PhysicalSafetySafe (minimal pairs: the same situation,
           harmful or sound advice asked for), so that topic and wording cancel;
    scary  the safe set's prompts against PhysicalSafetySafe (safe requests about danger);
    knn    nearness to the safe set's prompts against nearness to the mix's own (tenth
           session), `neighbour_scores`."""
    return {"harm": direction_scores(ref["safe"], row["feats"], row["feats"]),
            "pair": direction_scores(ref["unsafe_pairs"], ref["safe_pairs"], row["feats"]),
            "scary": direction_scores(ref["safe"], ref["safe_pairs"], row["feats"]),
            "knn": neighbour_scores(ref["safe"], row["feats"])}


def signals(row: dict[str, np.ndarray], projections: dict[str, np.ndarray],
            layer: int) -> dict[str, np.ndarray]:
    """The margin and every direction's projection at `layer`, refusals gated."""
    out = {"margin|gated": gated(row["margin"], row["refuses"])}
    for name, proj in projections.items():
        for p, pos in enumerate(POSITIONS):
            out[f"{name}_{pos}|gated"] = gated(proj[:, layer, p], row["refuses"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_mix_arguments(p)
    p.add_argument("--safe-data", default=str(SAFE))
    p.add_argument("--safe-sample", type=int, default=200, help="as the CPU settings")
    p.add_argument("--unsafe-pairs", default=str(PAIRS / "safetyllamas_I-PhysicalSafetyUnsafe.json"))
    p.add_argument("--safe-pairs", default=str(PAIRS / "safetyllamas_I-PhysicalSafetySafe.json"))
    p.add_argument("--layer", type=int, default=12, help="1-based; fixed before any run")
    p.add_argument("--model", default="Qwen/Qwen2.5-Coder-0.5B-Instruct")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/harm_probe")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    judge = KeywordRefusalJudge()
    memo: dict = {}
    loaded: list = []  # the model, loaded at the first mix not yet saved

    def cached(name: str, examples_fn) -> dict[str, np.ndarray]:
        def compute() -> dict[str, np.ndarray]:
            if not loaded:
                loaded.extend(load_model_and_tokenizer(a.model))
                loaded[0].eval()
            return mix_rows(*loaded, examples_fn(), judge, memo)

        def write(path: Path, row: dict[str, np.ndarray]) -> None:
            with path.open("wb") as f:  # a file object: savez would append ".npz" to a name
                np.savez(f, **row)

        return computed_once(out / f"{name}.npz", compute, write,
                             lambda path: dict(np.load(path)),
                             lambda row: f"{len(row['flags'])} rows, ")

    ref = {"safe": cached("safe", lambda: sample_rows(
        load_examples(a.safe_data, "train", "auto", None, True), a.safe_sample, 0))["feats"]}
    for key, path in (("unsafe_pairs", a.unsafe_pairs), ("safe_pairs", a.safe_pairs)):
        ref[key] = cached(key, lambda path=path: prompt_examples(path))["feats"]
    rows = {name: cached(name, load) for name, load in mixes(a)}
    projections = {mix: directions(row, ref) for mix, row in rows.items()}
    table = [(mix, row["flags"], signals(row, projections[mix], a.layer - 1))
             for mix, row in rows.items()]
    names = list(table[0][2]) if table else []
    print(signal_table(table, names, names))
    print("\nexploratory: mean over long-form mixes by layer (AUROC / removed / controls kept)")
    long_form = [mix for mix, row in rows.items() if (row["flags"] == "control").any()]
    for name in projections[long_form[0]] if long_form else ():
        for p, pos in enumerate(POSITIONS):
            cells = []
            for lay in range(ref["safe"].shape[1]):
                ms = [metrics(rows[mix]["flags"],
                              gated(projections[mix][name][:, lay, p], rows[mix]["refuses"]), 0.8)
                      for mix in long_form]
                cells.append(f"L{lay + 1} " + "{:.2f}/{:.2f}/{:.2f}".format(*np.mean(
                    [[m["auroc"], m["removed"], m["controls_kept"]] for m in ms], axis=0)))
            print(f"{name}_{pos}: " + "  ".join(cells))


if __name__ == "__main__":
    main()
