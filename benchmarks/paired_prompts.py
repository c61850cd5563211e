"""Research script (not the product): is a method's refusal rate different from all-data
fine-tuning's, prompt by prompt?

`sealft experiment` pairs each method with all data seed by seed and gives the mean difference
a Student-t interval over seeds. With three seeds that interval is wide (t = 4.30), and it
mixes two noises: which rows a seed trained on, and which 40 prompts happened to be asked. This
script reads the cells' per-prompt judgments instead: for every seed both cells finished, each
held-out prompt is a pair (did the method refuse, did all data refuse). Pooled over seeds, the
pairs where exactly one of the two refused decide; the exact McNemar test (a two-sided binomial
test of those discordant pairs at 1/2) says whether they lean one way.

What it does not cover: the pairs of one seed share a trained model, so the test is conditional
on the models these seeds trained; it is a complement to the t interval, not a replacement.

    python benchmarks/paired_prompts.py runs/experiment-gpt4 [--set heldout_harmful] [--against all]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from scipy.stats import binomtest

from sealft.io import read_jsonl
from sealft.report import read_rows_csv


@dataclass
class Pairs:
    method: str
    seeds: list[int]
    prompts: int = 0
    only_method: int = 0
    """Prompts the method refused and all data answered."""
    only_reference: int = 0
    """Prompts the reference (all data by default) refused and the method answered."""

    @property
    def difference(self) -> float:
        """Refusal rate of the method minus the reference's, in points, over the paired prompts."""
        return 100 * (self.only_method - self.only_reference) / max(self.prompts, 1)

    @property
    def p_value(self) -> float:
        """Exact McNemar: the discordant pairs against a fair coin (1.0 when there are none)."""
        discordant = self.only_method + self.only_reference
        return binomtest(self.only_method, discordant, 0.5).pvalue if discordant else 1.0


def refusals(cell_dir: Path, set_name: str) -> dict[str, bool] | None:
    """Prompt id -> refused, for one set of a cell's evaluation (None when not kept)."""
    path = cell_dir / "eval" / "judgments.jsonl"
    if not path.is_file():
        return None
    return {j["id"]: bool(j["refusal"]) for j in read_jsonl(path) if j["set"] == set_name}


def cell_dirs(experiment: Path) -> dict[tuple[str, int], Path]:
    """(method, seed) -> the cell's folder, for every finished cell whose folder is here: a
    cell merged from another machine's part keeps only its results row."""
    out = {}
    for row in read_rows_csv(experiment / "results.csv"):
        folder = experiment / "cells" / Path(str(row["cell_dir"])).name
        if row["status"] == "ok" and folder.is_dir():
            out[(str(row["method"]), int(row["seed"]))] = folder
    return out


def paired(experiment: Path, set_name: str, against: str = "all") -> list[Pairs]:
    """Every other method against `against`, its prompts paired seed by seed."""
    cells = cell_dirs(experiment)
    reference = {seed: refusals(d, set_name) for (m, seed), d in cells.items() if m == against}
    base = next((d for (m, _), d in cells.items() if m == "base"), None)
    out: dict[str, Pairs] = {}
    methods = {m for m, _ in cells if m != against}
    for method in sorted(methods):
        for seed, theirs in sorted(reference.items()):
            # The base model runs once; it stands beside every seed's all-data cell.
            folder = base if method == "base" else cells.get((method, seed))
            ours = refusals(folder, set_name) if folder else None
            if ours is None or theirs is None:
                continue
            pairs = out.setdefault(method, Pairs(method, []))
            pairs.seeds.append(seed)
            for prompt in ours.keys() & theirs.keys():
                pairs.prompts += 1
                pairs.only_method += ours[prompt] and not theirs[prompt]
                pairs.only_reference += theirs[prompt] and not ours[prompt]
    return list(out.values())


def table(rows: list[Pairs], set_name: str, against: str = "all") -> str:
    lines = [f"| method | seeds | {set_name} prompts paired | refused only by the method | "
             f"refused only by {against} | Δ refusal vs {against} (pts) | exact McNemar p |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: -r.difference):
        lines.append(f"| {r.method} | {','.join(map(str, r.seeds))} | {r.prompts} | "
                     f"{r.only_method} | {r.only_reference} | {r.difference:+.1f} | "
                     f"{r.p_value:.3g} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", type=Path, help="a `sealft experiment` output dir")
    parser.add_argument("--set", default="heldout_harmful",
                        help="the evaluation set whose prompts are paired (a judgments `set`)")
    parser.add_argument("--against", default="all",
                        help="the method every other one is paired with (e.g. random: does "
                             "the selection beat a random subset of the same size?)")
    args = parser.parse_args()
    print(table(paired(args.experiment, args.set, args.against), args.set, args.against))


if __name__ == "__main__":
    main()
