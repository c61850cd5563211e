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

    python benchmarks/paired_prompts.py runs/experiment-gpt4 [runs/other-grid-same-inputs ...] \\
        [--set heldout_harmful] [--against all]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from scipy.stats import binomtest

from sealft.experiment import BASE, INPUTS_FILE, differing_keys
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


def cell_dirs(experiment: Path) -> dict[tuple[str, str, int], Path]:
    """(method, keep ratio, seed) -> the cell's folder, for every finished cell whose folder is
    here: a cell merged from another machine's part keeps only its results row."""
    results = experiment / "results.csv"
    if not results.is_file():
        raise SystemExit(f"{results}: not found; pass a `sealft experiment` output dir")
    out = {}
    for row in read_rows_csv(results):
        folder = experiment / "cells" / Path(str(row["cell_dir"])).name
        if row["status"] == "ok" and folder.is_dir():
            out[(str(row["method"]), f"{float(row['keep_ratio']):g}", int(row["seed"]))] = folder
    return out


def paired(experiments: list[Path], set_name: str, against: str = "all") -> list[Pairs]:
    """Every other method (and keep ratio) against `against` of the first experiment, its
    prompts paired seed by seed. Later experiments must have asked the same prompts of the
    same samples (equal inputs.json); their methods are labelled with their folder's name."""
    first = experiments[0]
    cells = cell_dirs(first)
    ratios = {keep for m, keep, _ in cells if m == against}
    if len(ratios) != 1:
        found = sorted({m for m, _, _ in cells})
        raise SystemExit(f"--against {against}: needs one finished method of one keep ratio "
                         f"in {first} (keep ratios: {sorted(ratios) or 'none'}; methods: {found})")
    reference = {seed: refusals(d, set_name) for (m, _, seed), d in cells.items() if m == against}
    out: dict[str, Pairs] = {}
    for experiment in experiments:
        suffix = ""
        if experiment != first:
            # the same check as `sealft experiment --merge-dirs`: other data, other prompts
            changed = differing_keys(_inputs(experiment), _inputs(first))
            if changed:
                raise SystemExit(f"{experiment}: its inputs.json differs from {first}'s "
                                 f"({', '.join(changed)}); only runs of the same inputs pair up")
            suffix = f" [{experiment.name}]"
        theirs_cells = cells if experiment == first else cell_dirs(experiment)
        skip = against if experiment == first else None
        for label, by_seed in by_method(theirs_cells, set_name, skip).items():
            for seed, theirs in sorted(reference.items()):
                # The base model runs once (seed None): it stands beside every seed.
                ours = by_seed.get(seed, by_seed.get(None))
                if ours is None or theirs is None:
                    continue
                pairs = out.setdefault(label + suffix, Pairs(label + suffix, []))
                pairs.seeds.append(seed)
                for prompt in ours.keys() & theirs.keys():
                    pairs.prompts += 1
                    pairs.only_method += ours[prompt] and not theirs[prompt]
                    pairs.only_reference += theirs[prompt] and not ours[prompt]
    return list(out.values())


def by_method(cells: dict[tuple[str, str, int], Path], set_name: str,
              skip: str | None) -> dict[str, dict[int | None, dict[str, bool] | None]]:
    """Label -> seed -> the cell's refusals, each cell read once; the base model under None.
    A method run at several keep ratios gets one label per ratio."""
    ratios: dict[str, set[str]] = {}
    for method, keep, _ in cells:
        ratios.setdefault(method, set()).add(keep)
    out: dict[str, dict[int | None, dict[str, bool] | None]] = {}
    for (method, keep, seed), folder in sorted(cells.items()):
        if method == skip:
            continue
        label = f"{method} {keep}" if len(ratios[method]) > 1 else method
        out.setdefault(label, {})[None if method == BASE else seed] = refusals(folder, set_name)
    return out


def _inputs(experiment: Path) -> dict:
    path = experiment / INPUTS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


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
    parser.add_argument("experiments", type=Path, nargs="+",
                        help="`sealft experiment` output dirs: the first holds the --against "
                             "cells; later ones (same inputs.json) add their methods")
    parser.add_argument("--set", default="heldout_harmful",
                        help="the evaluation set whose prompts are paired (a judgments `set`)")
    parser.add_argument("--against", default="all",
                        help="the method every other one is paired with (e.g. random: does "
                             "the selection beat a random subset of the same size?)")
    args = parser.parse_args()
    print(table(paired(args.experiments, args.set, args.against), args.set, args.against))


if __name__ == "__main__":
    main()
