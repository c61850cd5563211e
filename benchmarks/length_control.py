"""A trivial control for a selection on a flagged mix: rank the rows by answer length alone.

A mix whose harmful answers are shorter than its benign ones (BeaverTails answers against
GPT-4's) lets "drop the shortest answers" find harm without reading it, as a one-word label
does on SST-2. Reading a selector's AUROC without this control overstates what it knows. For
each seed this reads a `sealft select` run's `scores.jsonl` and the file it selected from, and
prints, side by side:

  AUROC       P(a flagged row ranks below an unflagged one): the selector's logits, then
              answer length (shorter = lower)
  kept        flagged rows among the n kept: the selector's own n, then the n longest answers
  short       both AUROCs again against the unflagged rows no longer than the flagged rows'
              90th percentile: where length cannot help, does the selector still find harm?

    python benchmarks/length_control.py --seeds 0 1 2 \\
        --data runs/gentle/lr1e-4-s{seed}-all/train.json --selection runs/gentle/s{seed}-select

With `--cuts 0.5 0.4`, also the flagged rows each stricter (or looser) cut of the same
selector would keep: its top share of the scored rows by logit, against the same number of
longest answers and against a random cut's expectation. No training: it tells which cut is
worth fine-tuning on (benchmarks/keep_ratio_cells.sh trains one).

Mean ± 95% confidence interval over seeds (the experiment's `mean_ci`), and the paired
differences. Without a selection, `--mixes FILE ...` asks the mixes alone how far length gives
the flagged rows away (AUROC below 0.5: the flagged answers are the longer ones).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from sealft.data import normalise, read_rows
from sealft.experiment import mean_ci
from sealft.io import read_jsonl
from sealft.select import auroc
from sealft.selector import keep_count_for

SHORT_PERCENTILE = 90
"""The unflagged rows compared in the `short` columns: those no longer than this percentile of
the flagged answers' lengths (the 90th, not the maximum, so that one long flagged answer does
not let every row back in)."""


def answer_lengths(rows: list[dict], source: str = "<data>") -> dict[int, int]:
    """Row index -> characters of the trained answer (the last message), read through the
    product's own normaliser so that every data format it trains on is measured alike."""
    return {e["index"]: len(e["messages"][-1]["content"])
            for e in normalise(rows, source, drop_duplicates=True)}


def compare(rows: list[dict], scores: list[dict], flag_field: str = "flag",
            flagged: str = "unsafe") -> dict:
    """One seed: the selector against answer length, on the rows the selector scored."""
    scored = [s for s in scores if s.get("logit") is not None]  # skipped rows have no logit
    logits = np.array([s["logit"] for s in scored], dtype=float)
    answer = answer_lengths(rows)
    lengths = np.array([answer[s["index"]] for s in scored], dtype=float)
    harmful = np.array([rows[s["index"]].get(flag_field) == flagged for s in scored])
    kept = np.array([bool(s["kept"]) for s in scored])
    n = int(kept.sum())
    cap = np.percentile(lengths[harmful], SHORT_PERCENTILE) if harmful.any() else 0.0
    short = harmful | (lengths <= cap)
    # stable sort, so equal lengths keep file order: the control is deterministic
    longest = np.argsort(-lengths, kind="stable")[:n]
    return {"rows": len(scored), "flagged": int(harmful.sum()), "kept_n": n,
            # AUROC of "flagged" against the negated score: a low logit (or a short answer)
            # should mean harmful
            "selector_auroc": auroc(-logits, harmful), "length_auroc": auroc(-lengths, harmful),
            "short_others": int((short & ~harmful).sum()),
            "selector_auroc_short": auroc(-logits[short], harmful[short]),
            "length_auroc_short": auroc(-lengths[short], harmful[short]),
            "selector_kept_flagged": int((harmful & kept).sum()),
            "length_kept_flagged": int(harmful[longest].sum())}


def cut(rows: list[dict], scores: list[dict], share: float, flag_field: str = "flag",
        flagged: str = "unsafe") -> dict:
    """Flagged rows among the top `share` of the scored rows (counted as `sealft select` counts
    keep_ratio): by the selector's logit, by answer length, and a random cut's mean."""
    scored = [s for s in scores if s.get("logit") is not None]
    n = keep_count_for(len(scored), share, None)
    answer = answer_lengths(rows)
    harmful = np.array([rows[s["index"]].get(flag_field) == flagged for s in scored])
    logits = np.array([s["logit"] for s in scored], dtype=float)
    lengths = np.array([answer[s["index"]] for s in scored], dtype=float)
    top = np.argsort(-logits, kind="stable")[:n]
    longest = np.argsort(-lengths, kind="stable")[:n]
    return {"n": n, "selector": int(harmful[top].sum()), "length": int(harmful[longest].sum()),
            "random": float(harmful.sum() * n / len(scored))}


def render_cuts(by_seed: dict[int, dict[float, dict]]) -> str:
    lines = ["| cut | rows kept | flagged kept, selector | flagged kept, n longest | "
             "flagged kept, random (expected) | selector − length (paired) |",
             "|---" * 6 + "|"]
    shares = next(iter(by_seed.values())).keys()
    for share in shares:
        runs = [cuts[share] for cuts in by_seed.values()]
        sel, length = [r["selector"] for r in runs], [r["length"] for r in runs]
        gap = [a - b for a, b in zip(sel, length, strict=True)]
        kept = sorted({r["n"] for r in runs})
        lines.append(f"| {share:g} | {', '.join(map(str, kept))} | {_fmt(sel, 1)} | "
                     f"{_fmt(length, 1)} | {_fmt([r['random'] for r in runs], 1)} | "
                     f"{_fmt(gap, 1)} |")
    return "\n".join(lines)


def mix_length(rows: list[dict], flag_field: str = "flag", flagged: str = "unsafe") -> dict:
    """A mix alone: the AUROC of "shorter answer = flagged" over all its rows, and the median
    answer length of flagged and other rows."""
    answer = answer_lengths(rows)
    lengths = np.array(list(answer.values()), dtype=float)
    harmful = np.array([rows[i].get(flag_field) == flagged for i in answer])
    return {"rows": len(answer), "flagged": int(harmful.sum()),
            "length_auroc": auroc(-lengths, harmful),
            "flagged_median_chars": float(np.median(lengths[harmful])) if harmful.any() else None,
            "other_median_chars": float(np.median(lengths[~harmful])) if (~harmful).any() else None}


def _auroc(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _fmt(values: list[float], digits: int) -> str:
    mean, half = mean_ci(values)
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" + ("" if half is None else f" ± {half:.{digits}f}")


def render(by_seed: dict[int, dict]) -> str:
    lines = ["| seed | rows | flagged | kept | AUROC selector | AUROC length | flagged kept, "
             "selector | flagged kept, n longest | short others | AUROC selector, short | "
             "AUROC length, short |", "|---" * 11 + "|"]
    for seed, r in by_seed.items():
        aurocs = [_auroc(r[k]) for k in ("selector_auroc", "length_auroc")]
        short = [_auroc(r[k]) for k in ("selector_auroc_short", "length_auroc_short")]
        lines.append(f"| {seed} | {r['rows']} | {r['flagged']} | {r['kept_n']} | {aurocs[0]} | "
                     f"{aurocs[1]} | {r['selector_kept_flagged']} | {r['length_kept_flagged']} "
                     f"| {r['short_others']} | {short[0]} | {short[1]} |")
    runs = list(by_seed.values())
    both = [r for r in runs if r["selector_auroc"] is not None and r["length_auroc"] is not None]
    sel = [r["selector_auroc"] for r in both]
    length = [r["length_auroc"] for r in both]
    kept_sel = [r["selector_kept_flagged"] for r in runs]
    kept_len = [r["length_kept_flagged"] for r in runs]
    auroc_gap = [a - b for a, b in zip(sel, length, strict=True)]
    kept_gap = [a - b for a, b in zip(kept_sel, kept_len, strict=True)]
    lines += ["", f"AUROC: selector {_fmt(sel, 3)}, length {_fmt(length, 3)}, "
              f"selector − length {_fmt(auroc_gap, 3)} (paired by seed)",
              f"flagged rows kept: selector {_fmt(kept_sel, 1)}, n longest {_fmt(kept_len, 1)}, "
              f"selector − length {_fmt(kept_gap, 1)} (paired by seed)"]
    short = [r for r in runs if r["selector_auroc_short"] is not None
             and r["length_auroc_short"] is not None]
    lines.append(f"AUROC against the short unflagged rows: selector "
                 f"{_fmt([r['selector_auroc_short'] for r in short], 3)}, length "
                 f"{_fmt([r['length_auroc_short'] for r in short], 3)}")
    return "\n".join(lines)


def render_mixes(by_file: dict[str, dict]) -> str:
    lines = ["| mix | rows | flagged | AUROC, shorter = flagged | median chars, flagged | "
             "median chars, others |", "|---|---|---|---|---|---|"]
    for name, r in by_file.items():
        value = _auroc(r["length_auroc"])
        medians = [("–" if m is None else f"{m:.0f}")
                   for m in (r["flagged_median_chars"], r["other_median_chars"])]
        lines.append(f"| {name} | {r['rows']} | {r['flagged']} | {value} | {medians[0]} | "
                     f"{medians[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--data", metavar="PATTERN",
                   help="the file each selection ran on, {seed} in the pattern")
    p.add_argument("--selection", metavar="PATTERN",
                   help="the `sealft select` run folders, {seed} in the pattern")
    p.add_argument("--mixes", nargs="+", metavar="FILE",
                   help="instead: the length AUROC of each mix alone, no selection needed")
    p.add_argument("--cuts", type=float, nargs="+", default=[], metavar="SHARE",
                   help="also the flagged rows kept at these shares of the scored rows")
    p.add_argument("--flag-field", default="flag")
    p.add_argument("--flagged", default="unsafe", help="the flag value of a harmful row")
    args = p.parse_args(argv)
    if args.mixes:
        print(render_mixes({f: mix_length(read_rows(f), args.flag_field, args.flagged)
                            for f in args.mixes}))
        return
    for flag in ("seeds", "data", "selection"):
        if getattr(args, flag) is None:
            p.error(f"--{flag} is required without --mixes")
    if any(not 0 < share <= 1 for share in args.cuts):
        p.error("--cuts: give shares in (0, 1], e.g. --cuts 0.5 0.4")
    by_seed, cuts = {}, {}
    for seed in args.seeds:
        data = Path(args.data.format(seed=seed))
        scores = Path(args.selection.format(seed=seed)) / "scores.jsonl"
        for path, flag in ((data, "--data"), (scores, "--selection")):
            if not path.is_file():
                p.error(f"{flag}: {path} does not exist (seed {seed}); run the cells first")
        rows, scored = read_rows(str(data)), list(read_jsonl(scores))
        by_seed[seed] = compare(rows, scored, args.flag_field, args.flagged)
        cuts[seed] = {share: cut(rows, scored, share, args.flag_field, args.flagged)
                      for share in args.cuts}
    print(render(by_seed))
    if args.cuts:
        print("\n" + render_cuts(cuts))


if __name__ == "__main__":
    main()
