"""Does the selector find the harmful rows the proxy itself would refuse, and only those?

Research script (issue 11), not the product. For each selection run over a flagged mix, the
frozen proxy answers every flagged row's question (greedy, the evaluation's keyword judge),
and the harmful rows are split by that answer: those the proxy refuses and those it answers.
If the selector removes the first group and keeps the second, its ranking carries no more
than the proxy's own sense of which questions to refuse, and a better ranking needs a proxy
that refuses more of them.

    python benchmarks/proxy_refusal_ceiling.py --out runs/refusal_ceiling \
        --run runs/erosion-G2-s0-select=runs/erosion-G2-s0-all/train.json ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from sealft.data import load_examples
from sealft.evaluate import EvaluateArgs, evaluate
from sealft.io import read_jsonl, write_jsonl

SET = "flagged"


def question(example: dict[str, Any]) -> str:
    return example["messages"][-2]["content"]


def proxy_refusals(questions: list[str], out: Path, args: argparse.Namespace) -> dict[str, bool]:
    """question -> did the frozen proxy refuse it (generated once per distinct question)."""
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "questions.jsonl"
    if prompts.exists() and [r["prompt"] for r in read_jsonl(prompts)] != questions:
        # its eval/ resumes the answers to those questions, not to these
        raise SystemExit(f"{out}: holds the proxy's answers to other questions; use another --out")
    write_jsonl(prompts, [{"prompt": q} for q in questions])
    folder = out / "eval"
    evaluate(EvaluateArgs(
        model=args.model, suite="custom", prompt_files=(f"{SET}={prompts}#prompt",),
        output_dir=str(folder), resume=folder.exists(), max_new_tokens=args.max_new_tokens,
        system_prompt=args.system_prompt,
        batch_size=16, threads=args.threads, show_progress=False))
    return read_refusals(out)


def read_refusals(out: Path) -> dict[str, bool]:
    """question -> refused, from the output folder of a finished run."""
    questions = [r["prompt"] for r in read_jsonl(out / "questions.jsonl")]
    judged = {r["id"]: r["refusal"] for r in read_jsonl(out / "eval" / "judgments.jsonl")}
    return {q: judged[f"{SET}:{i}"] for i, q in enumerate(questions)}


def group_auroc(benign: np.ndarray, group: list, value: Any,
                score: np.ndarray) -> tuple[int, float | None]:
    """How many harmful rows have `group` equal to `value` (benign rows: None), and the AUROC
    of `score` for those rows against the benign ones (None when there are none)."""
    harmful = np.array([g is not None and g == value for g in group])
    n = int(harmful.sum())
    pick = benign | harmful
    return n, (roc_auc_score(harmful[pick], score[pick]) if n else None)


def split_run(select_dir: Path, examples, refused: dict[str, bool],
              label_field: str) -> dict[str, Any]:
    """What the run at `select_dir` removed of each group of the mix's `examples` (the
    normalised rows of the file it selected from)."""
    scores = {s["index"]: s for s in read_jsonl(select_dir / "scores.jsonl")}
    groups: dict[str, list[dict[str, Any]]] = {"refused": [], "answered": [], "benign": [],
                                               "control": []}
    for e in examples:
        score = scores.get(e["index"], {})
        if score.get("logit") is None:  # a row the run could not use (too long)
            continue
        flag = e["meta"].get(label_field)
        if flag == "unsafe":
            groups["refused" if refused[question(e)] else "answered"].append(score)
        else:
            groups["control" if flag == "control" else "benign"].append(score)
    benign = [-s["logit"] for s in groups["benign"]]
    result: dict[str, Any] = {"run": str(select_dir)}
    for name in ("refused", "answered"):
        group = groups[name]
        removed = sum(not s["kept"] for s in group)
        auroc = (roc_auc_score([0] * len(benign) + [1] * len(group),
                               benign + [-s["logit"] for s in group]) if group else None)
        result[name] = {"n": len(group), "removed": removed, "auroc_vs_benign": auroc}
    for name in ("benign", "control"):
        result[name] = {"n": len(groups[name]),
                        "removed": sum(not s["kept"] for s in groups[name])}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="SELECT_DIR=TRAIN",
                        help="a selection run's folder and the mix file it selected from")
    parser.add_argument("--out", default="runs/refusal_ceiling")
    parser.add_argument("--model", default="Qwen/Qwen2.5-Coder-0.5B-Instruct")
    parser.add_argument("--label-field", default="flag")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--system-prompt", default=None,
                        help="a system prompt for the proxy's answers ('safe': judge_probe's "
                             "SAFE_SYSTEM)")
    args = parser.parse_args(argv)
    if args.system_prompt == "safe":
        from judge_probe import SAFE_SYSTEM
        args.system_prompt = SAFE_SYSTEM
    torch.set_num_threads(args.threads)
    runs = []
    for item in args.run:
        select_dir, sep, train = item.partition("=")
        if not sep:
            parser.error(f"--run {item}: expected SELECT_DIR=TRAIN")
        runs.append((Path(select_dir), load_examples(train, "train", "auto", None, False)))
    questions = sorted({question(e) for _, examples in runs for e in examples
                        if e["meta"].get(args.label_field) == "unsafe"})
    refused = proxy_refusals(questions, Path(args.out), args)
    print(f"the proxy refuses {sum(refused.values())} of {len(refused)} distinct flagged "
          f"questions", file=sys.stderr)
    results = [split_run(d, examples, refused, args.label_field) for d, examples in runs]
    write_jsonl(Path(args.out) / "results.jsonl", results)
    print("| run | harmful rows the proxy refuses: removed / AUROC vs benign | harmful rows it "
          "answers: removed / AUROC vs benign | benign removed | controls removed |")
    print("|---|---|---|---|---|")
    for r in results:
        cells = [f"{r[g]['removed']} of {r[g]['n']} / "
                 + (f"{r[g]['auroc_vs_benign']:.3f}" if r[g]["auroc_vs_benign"] is not None
                    else "–") for g in ("refused", "answered")]
        print(f"| {r['run']} | {cells[0]} | {cells[1]} | "
              f"{r['benign']['removed']} of {r['benign']['n']} | "
              f"{r['control']['removed']} of {r['control']['n']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
