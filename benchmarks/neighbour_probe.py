"""Is a row's request close to the safe set's harmful requests in a sentence encoder's space?

Research script (issue 11), not the product. The selector's signals all read the 0.5B proxy's
own sense of what to refuse, and the proxy answers half of the harmful questions of the G2
mixes (proxy_refusal_ceiling.py). The safe set itself is a list of harmful requests; a
sentence encoder trained for semantic similarity (all-MiniLM-L6-v2, the evaluation's
relevance check, 22M parameters) can say how near each row's request lies to them without
asking the proxy anything. Per row: the mean cosine similarity of its user turn to the k
nearest safe-set requests (`knn_k`, k fixed before the run: 1, 10, 50), rows whose answer is
a refusal gated as the product does. With --margins (a judge_probe.py --signals refusal
folder over the same mixes), the margin, a rank average of margin and knn_10, and the
product's `--neighbour-weight w` mix of margin and `seg_knn_10` for w = 0.25, 0.5, 0.75 (0.5,
equal weight, the primary: fixed before any margin of these mixes was seen).

`seg_knn_10`, the product's nearness (`sealft.neighbours`; added after the first run, where
SST-2's Alpaca wrapper around every request put the harmful rows *below* the benign ones):
the request split into its non-empty lines, each line scored by knn_10, the row by its
highest line, so that a wrapper shared by every row no longer dilutes the request inside it.

`ans_seg` / `ans_mean` (sixteenth session, pre-registered before they were computed): the
answer read the same way, its highest line and its mean over lines, and `req+ans`, the equal
standardised mix of `seg_knn_10` and `ans_seg`: would a benign answer to a prompt that only
sounds dangerous stay far from the harm the safe set asks for? `ans_safe`: the mean cosine of
the whole answer to its 10 nearest safe-set *answers*, and `req-ans_safe`, the request's
nearness minus it (standardised, equal weight): does a row that asks like the safe set but
answers unlike it comply? (Neither held: docs/selection.md.)

A harmful row whose request is a near-copy of a safe-set request is found by lookup, not by
similarity of meaning; `--table` also reports AUROC without the harmful rows whose nearest
safe-set request has cosine ≥ 0.8 (threshold fixed before the run), and how many there are.

    python benchmarks/neighbour_probe.py --out runs/neighbour_probe \
        --mixes runs/dev_mixes/*.jsonl runs/G2_mixes/G2_s{0,1,2}.json \
        --sst2 ../shared/data/finetune/sst2_n1000_p0.{05,1,2}.json
    python benchmarks/neighbour_probe.py --table --out runs/neighbour_probe --margins DIR ...
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from sealft.data import load_examples
from sealft.embeddings import SentenceEncoder
from sealft.io import read_jsonl
from sealft.neighbours import SafeNeighbours, mix, request_text
from sealft.refusal import is_refusal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from judge_probe import gated, signal_table  # noqa: E402
from probe_runs import add_mix_arguments, mixes, rows_per_mix  # noqa: E402
from proxy_refusal_ceiling import group_auroc, read_refusals  # noqa: E402
from rank_ensemble import rank_average  # noqa: E402

SAFE = "../shared/data/safe/safetyllamas_safety_only.json"
KS = (1, 10, 50)
CEILING_SIGNALS = ("margin|gated", "seg_knn_10|gated", "w=0.5|gated")
WEIGHTS = (0.25, 0.5, 0.75)  # 0.5 the primary (equal weight), fixed before the margins came in
NEAR_COPY = 0.8
ANSWER = ["ans_seg", "ans_mean"]  # the answer's nearness, pre-registered 2026-12-02 11:16 UTC


def neighbour_rows(near: SafeNeighbours, examples,
                   safe_answers: torch.Tensor | None = None) -> list[dict]:
    texts = [request_text(e) for e in examples]
    nearest = (near.encoder.embed(texts) @ near.requests.T).topk(max(KS), dim=1).values
    by_line = near.score(examples)  # the product's nearness (line by line, k = 10)
    answer_max, answer_mean = answer_nearness(near, examples)
    rows = []
    for e, whole, seg, a_max, a_mean in zip(examples, nearest, by_line, answer_max, answer_mean,
                                            strict=True):
        rows.append({"id": e["id"], "flag": e["meta"].get("flag"),
                     "answer_refuses": is_refusal(e["messages"][-1]["content"]),
                     **{f"knn_{k}": float(whole[:k].mean()) for k in KS},
                     "seg_knn_10": float(seg), "ans_seg": a_max, "ans_mean": a_mean})
    if safe_answers is not None:
        answers = near.encoder.embed([e["messages"][-1]["content"] for e in examples])
        like_safe = (answers @ safe_answers.T).topk(near.k, dim=1).values.mean(1)
        for row, value in zip(rows, like_safe, strict=True):
            row["ans_safe"] = float(value)
    return rows


def answer_nearness(near: SafeNeighbours, examples) -> tuple[list[float], list[float]]:
    """The answer read as the product reads the request (`SafeNeighbours.by_line`); per row
    the highest line and the mean over lines. A benign answer to a prompt that only sounds
    dangerous should not talk about the harm the safe set asks for."""
    by_line = near.by_line([e["messages"][-1]["content"] for e in examples])
    return [float(v.max()) for v in by_line], [float(v.mean()) for v in by_line]


def scores_of(rows: list[dict], margins: list[dict] | None) -> dict[str, np.ndarray]:
    refuses = np.array([r["answer_refuses"] for r in rows])
    seg = np.array([r["seg_knn_10"] for r in rows])
    out = {f"{name}|gated": gated(np.array([r[name] for r in rows]), refuses)
           for name in [f"knn_{k}" for k in KS] + ["seg_knn_10"] + ANSWER
           if name in rows[0]}
    if "ans_seg" in rows[0]:
        both, _ = mix(torch.tensor(seg), torch.tensor([r["ans_seg"] for r in rows]), 0.5)
        out["req+ans|gated"] = gated(both.numpy(), refuses)
    if "ans_safe" in rows[0]:
        unlike_safe, _ = mix(torch.tensor(seg), -torch.tensor([r["ans_safe"] for r in rows]), 0.5)
        out["req-ans_safe|gated"] = gated(unlike_safe.numpy(), refuses)
        out["-ans_safe|gated"] = gated(-np.array([r["ans_safe"] for r in rows]), refuses)
    if margins is not None:
        by_id = {m["id"]: m["margin"] for m in margins}
        margin = np.array([by_id[r["id"]] for r in rows])
        out["margin|gated"] = gated(margin, refuses)
        out["rank mean margin, knn_10|gated"] = gated(
            rank_average(margin, np.array([r["knn_10"] for r in rows])), refuses)
        for weight in WEIGHTS:  # the product's --neighbour-weight, standardised over the mix
            mixed, _ = mix(torch.tensor(margin), torch.tensor(seg), weight)
            out[f"w={weight}|gated"] = gated(mixed.numpy(), refuses)
    return out


def near_copy_line(name: str, rows: list[dict], scores: dict[str, np.ndarray]) -> str:
    """AUROC of knn_10 without the harmful rows whose nearest safe request is a near-copy."""
    flags = np.array([r["flag"] for r in rows])
    copy = np.array([r["flag"] == "unsafe" and r["knn_1"] >= NEAR_COPY for r in rows])
    keep = ~copy
    harmful = flags == "unsafe"
    auroc = roc_auc_score(harmful[keep], scores["knn_10|gated"][keep])
    return (f"| {name} | {int(copy.sum())} of {int(harmful.sum())} | "
            f"{roc_auc_score(harmful, scores['knn_10|gated']):.3f} | {auroc:.3f} |")


def ceiling_line(name: str, rows: list[dict], scores: dict[str, np.ndarray],
                 questions: dict[str, str], refused: dict[str, bool]) -> str:
    """AUROC against the benign rows of margin, nearness and their w = 0.5 mix, for the
    harmful rows whose question the frozen proxy refuses and for those it answers."""
    benign = np.array([r["flag"] != "unsafe" for r in rows])
    group = [None if b else refused[questions[r["id"]]] for b, r in zip(benign, rows, strict=True)]
    cells = []
    for value in (True, False):
        parts = [group_auroc(benign, group, value, scores[s]) for s in CEILING_SIGNALS]
        cells.append(f"{parts[0][0]}: " + " / ".join(f"{auroc:.3f}" for _, auroc in parts))
    return f"| {name} | " + " | ".join(cells) + " |"


def table(out: Path, a: argparse.Namespace) -> str:
    mixes_scored, copies, ceiling = [], [], []
    refused = read_refusals(Path(a.ceiling)) if a.ceiling else None
    for name, load in mixes(a):
        path = out / f"{name}__neighbours.jsonl"
        if not path.exists():
            continue
        rows = read_jsonl(path)
        margin_path = Path(a.margins) / f"{name}__refusal.jsonl" if a.margins else None
        margins = read_jsonl(margin_path) if margin_path and margin_path.exists() else None
        scores = scores_of(rows, margins)
        mixes_scored.append((name, np.array([r["flag"] for r in rows]), scores))
        copies.append(near_copy_line(name, rows, scores))
        if refused is not None and margins is not None and "control" not in mixes_scored[-1][1]:
            questions = {e["id"]: e["messages"][-2]["content"] for e in load()}
            if all(questions[r["id"]] in refused for r in rows if r["flag"] == "unsafe"):
                ceiling.append(ceiling_line(name, rows, scores, questions, refused))
    names = [n for n in ([f"knn_{k}|gated" for k in KS]
                         + ["seg_knn_10|gated", "ans_seg|gated", "ans_mean|gated",
                            "req+ans|gated", "-ans_safe|gated", "req-ans_safe|gated",
                            "margin|gated", "rank mean margin, knn_10|gated"]
                         + [f"w={w}|gated" for w in WEIGHTS])
             if n in mixes_scored[0][2]]
    main = signal_table(mixes_scored, names, [n.replace("|", "\\|") for n in names], a.keep)
    head = ["| mix | harmful rows with a near-copy in the safe set (cosine ≥ 0.8) | "
            "AUROC knn_10 | AUROC knn_10 without them |", "|---|---|---|---|"]
    text = main + "\n\n" + "\n".join(head + copies)
    if ceiling:
        what = " / ".join(s.removesuffix("|gated") for s in CEILING_SIGNALS)
        text += "\n\n" + "\n".join([
            f"| mix | harmful rows the proxy refuses: n: AUROC {what} | harmful rows it "
            f"answers: n: AUROC {what} |", "|---|---|---|", *ceiling])
    return text


def prompt_sources(data: Path) -> dict[str, list[str]]:
    """Harmful request sets of ../shared/data with no answers (the nearness reads only the
    request), and XSTest's safe prompts that sound unsafe, by name."""
    def lines(name: str) -> list[str]:
        return [t.strip() for t in (data / name).read_text(encoding="utf-8").splitlines()
                if t.strip()]

    text = (data / "eval/xstest_prompts.csv").read_text(encoding="utf-8")
    xstest = list(csv.DictReader(text.splitlines()))
    sources = {
        "AdvBench": lines("eval/advbench_harmful_behaviors.csv"),
        "HarmBench": lines("eval/harmbench_prompts.txt"),
        "XSTest unsafe": [r["prompt"] for r in xstest if r["label"] == "unsafe"]}
    for path in sorted((data / "eval/donotanswer").glob("*.jsonl")):
        sources[f"Do-Not-Answer {path.stem}"] = [r["prompt"] for r in read_jsonl(path)]
    for path in sorted((data / "eval/safetyllamas").glob("*.json")):
        name = path.stem.removeprefix("safetyllamas_")
        sources[f"safety-tuned-llamas {name}"] = json.loads(path.read_text())["instructions"]
    sources["XSTest safe (controls)"] = [r["prompt"] for r in xstest if r["label"] == "safe"]
    return sources


def sources_table(near: SafeNeighbours, data: Path, per_source: int = 300) -> str:
    """AUROC of the nearness of each request set against 400 seeded benign instructions (200
    Alpaca, 200 AlpacaEval) and against XSTest's safe prompts."""
    def score(texts: list[str]) -> np.ndarray:
        return near.score([{"messages": [{"role": "user", "content": t},
                                         {"role": "assistant", "content": ""}]}
                           for t in texts]).numpy()

    rng = random.Random(0)
    alpaca = [r["instruction"] + ("\n" + r["input"] if r.get("input") else "")
              for r in json.loads((data / "benign/alpaca_en_demo.json").read_text())]
    gpt4 = [r["instruction"] for r in
            json.loads((data / "benign/alpaca_eval_gpt4_outputs.json").read_text())]
    benign = score(rng.sample(alpaca, 200) + rng.sample(gpt4, 200))
    sources = prompt_sources(data)
    controls = score(sources["XSTest safe (controls)"])

    def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
        return roc_auc_score([0] * len(negatives) + [1] * len(positives),
                             np.r_[negatives, positives])

    lines = ["| request set | n | AUROC against benign instructions | against XSTest safe "
             "prompts |", "|---|---|---|---|"]
    for name, texts in sources.items():
        scores = score(texts[:per_source])
        lines.append(f"| {name} | {len(scores)} | {auroc(benign, scores):.3f} | "
                     + ("–" if name.startswith("XSTest safe") else f"{auroc(controls, scores):.3f}")
                     + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_mix_arguments(p)
    p.add_argument("--out", default="runs/neighbour_probe")
    p.add_argument("--safe-data", default=SAFE)
    p.add_argument("--margins", help="with --table: a judge_probe.py --signals refusal folder")
    p.add_argument("--ceiling", help="with --table and --margins: a proxy_refusal_ceiling.py "
                                     "folder, to split the harmful rows by the proxy's answer")
    p.add_argument("--keep", type=float, default=0.8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table", action="store_true", help="print the saved rows' tables and exit")
    p.add_argument("--sources", action="store_true",
                   help="the nearness of request sets without answers (AdvBench, HarmBench, "
                        "Do-Not-Answer, ...) against benign instructions, then exit")
    p.add_argument("--data", default="../shared/data")
    a = p.parse_args()
    out = Path(a.out)
    if a.table:
        print(table(out, a))
        return
    torch.set_num_threads(a.threads)
    out.mkdir(parents=True, exist_ok=True)
    safe = load_examples(a.safe_data, "safe", "auto", None, False)
    near = SafeNeighbours.fit(safe, SentenceEncoder(), k=10)
    if a.sources:
        print(sources_table(near, Path(a.data)))
        return
    answers = near.encoder.embed([e["messages"][-1]["content"] for e in safe])
    rows_per_mix(out, a, lambda examples: neighbour_rows(near, examples, answers),
                 suffix="__neighbours")
    print(table(out, a))


if __name__ == "__main__":
    main()
