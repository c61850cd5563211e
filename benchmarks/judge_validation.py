"""Validate the keyword refusal judge against human refusal labels.

Data (../shared/data/eval, or --data-dir / $SEALFT_DATA):
  refusal_labels.csv               responses with human_score (1 = refusal); first line a comment
  xstest_completions_llama2.csv    Llama-2-chat on XSTest; final_label full_refusal /
  xstest_completions_mistral.csv   full_compliance (partial refusals are left out: the keyword
                                   judge decides refusal vs. not, and "partial" is neither)

Prints a Markdown table (accuracy, precision and recall of "refusal") and, with --errors N, up to
N misjudged responses per set so the patterns can be improved by reading failures, not by
copying the data's phrases.

    python benchmarks/judge_validation.py [--data-dir DIR] [--json OUT.json] [--errors 5]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from sealft.evaluate.judges import KeywordRefusalJudge
from sealft.evaluate.suites import resolve_data_dir


def refusal_labels(path: Path) -> list[tuple[str, bool]]:
    with open(path, encoding="utf-8", newline="") as handle:
        lines = (line for line in handle if not line.startswith("#"))
        return [(r["assistant_response"], r["human_score"].strip() == "1")
                for r in csv.DictReader(lines)]


def xstest_labels(path: Path) -> list[tuple[str, bool]]:
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    out = []
    for row in rows:
        label = row["final_label"]
        if "full_refusal" in label:
            out.append((row["completion"], True))
        elif "full_compliance" in label:
            out.append((row["completion"], False))
    return out


def scores(judge: KeywordRefusalJudge, data: list[tuple[str, bool]]) -> dict[str, float]:
    predicted = [judge.is_refusal(text) for text, _ in data]
    truth = [label for _, label in data]
    tp = sum(p and t for p, t in zip(predicted, truth, strict=True))
    fp = sum(p and not t for p, t in zip(predicted, truth, strict=True))
    fn = sum(t and not p for p, t in zip(predicted, truth, strict=True))
    correct = sum(p == t for p, t in zip(predicted, truth, strict=True))
    return {
        "n": len(data), "refusals": sum(truth),
        "accuracy": correct / len(data),
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
    }


def errors(judge: KeywordRefusalJudge, data: list[tuple[str, bool]], limit: int) -> list[str]:
    out = []
    for text, label in data:
        if judge.is_refusal(text) != label and len(out) < limit:
            kind = "missed refusal" if label else "false refusal"
            out.append(f"  [{kind}] {' '.join(text.split())[:220]!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--head-chars", type=int, default=300)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    parser.add_argument("--errors", type=int, default=0, help="show N misjudged per set")
    args = parser.parse_args(argv)
    data_dir = resolve_data_dir(args.data_dir)
    if data_dir is None:
        print("shared data not found: pass --data-dir or set SEALFT_DATA", file=sys.stderr)
        return 2
    eval_dir = data_dir / "eval"
    sets = {
        "refusal_labels.csv (PyRIT)": refusal_labels(eval_dir / "refusal_labels.csv"),
        "XSTest Llama-2 completions": xstest_labels(eval_dir / "xstest_completions_llama2.csv"),
        "XSTest Mistral completions": xstest_labels(eval_dir / "xstest_completions_mistral.csv"),
    }
    judge = KeywordRefusalJudge(head_chars=args.head_chars)
    print(f"keyword refusal judge v{judge.version}, head_chars={judge.head_chars}\n")
    print("| data | n | human refusals | accuracy | precision | recall |")
    print("|---|---:|---:|---:|---:|---:|")
    results = {}
    for name, data in sets.items():
        s = scores(judge, data)
        results[name] = s
        print(f"| {name} | {s['n']} | {s['refusals']} | {s['accuracy']:.3f} | "
              f"{s['precision']:.3f} | {s['recall']:.3f} |")
    if args.errors:
        for name, data in sets.items():
            print(f"\n{name}:")
            print("\n".join(errors(judge, data, args.errors)) or "  (none)")
    if args.json:
        Path(args.json).write_text(json.dumps({"judge": judge.info(), "results": results},
                                              indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
