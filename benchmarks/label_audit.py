"""Research script (not the product): how far are the dev mixes' labels from what their rows
say, and how does the selector rank on the rows whose label a second reader agrees with?

The targets of the selection issue (AUROC >= 0.95, >= 90% of harmful rows removed, >= 95% of
controls kept) are measured against `flag`. A BeaverTails row is `unsafe` as a question-answer
pair, yet some of its answers refuse, insult the asker or answer harmlessly; an XSTest control
is labelled by humans, but as a completion, not as training data. This script makes a blind
reading of every distinct harmful and control row of the dev mixes (plus a seeded sample of
benign rows as a check on the reader), and scores the product's rankings on both labellings.

    python benchmarks/label_audit.py build --mixes runs/dev_mixes/*.jsonl --out runs/label_audit
    # readers label runs/label_audit/blind.jsonl -> labels.jsonl, labels2.jsonl, seeing request
    # and answer only; export keys their labels by row hash into label_audit_reads.jsonl
    python benchmarks/label_audit.py export
    python benchmarks/label_audit.py table --run \
        runs/dev_mixes/alpaca-xstest_s0.jsonl=runs/sweep_neighbours/neighbours-0.5-alpaca-xstest_s0-s0

The `--run` folders are `sealft select` runs with `--neighbour-weight 0.5`; the default's
ranking (the refusal margin alone) is recovered from them exactly, because the run saves the
mean and spread of both parts of the mix (`scorer/scoring.json`), and every row's nearness is
read from `benchmarks/neighbour_probe.py`'s rows (`--near`, the same encoder and safe set).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from sealft.data import read_rows
from sealft.io import read_jsonl, write_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from judge_probe import metrics  # noqa: E402

AGREED = {"unsafe": "H", "control": "N", "benign": "N"}
# The two readers' labels of this study, by row hash (no text of the data).
READS = Path(__file__).resolve().parent / "label_audit_reads.jsonl"


def row_key(row: dict) -> str:
    text = "\x00".join((row["instruction"], row.get("input") or "", row["output"]))
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def build(mixes: list[str], out: Path, benign: int, seed: int,
          read_before: set[str] = frozenset()) -> None:
    """blind.jsonl (n, request, answer; shuffled, no flag) and truth.json (n -> key, flag).
    Flagged rows in `read_before` (keys of the rows of an earlier reading's mixes) are left
    out."""
    flagged: dict[str, dict] = {}
    plain: list[tuple[str, dict]] = []  # every benign row of every mix, as drawn for the audit
    for path in sorted(mixes):
        for row in read_jsonl(path):
            if row["flag"] == "benign":
                plain.append((row_key(row), row))
            elif row_key(row) not in read_before:
                flagged.setdefault(row_key(row), row)
    rng = random.Random(seed)
    items = list(flagged.items()) + rng.sample(sorted(plain, key=lambda item: item[0]), benign)
    rng.shuffle(items)
    out.mkdir(parents=True, exist_ok=True)
    blind, truth = [], {}
    for n, (key, row) in enumerate(items):
        request = row["instruction"] + (f"\n{row['input']}" if row.get("input") else "")
        blind.append({"n": n, "request": request[:800], "answer": row["output"][:900]})
        truth[n] = {"key": key, "flag": row["flag"], "source": row.get("source")}
    write_jsonl(out / "blind.jsonl", blind)
    (out / "truth.json").write_text(json.dumps(truth))
    print(f"{len(items)} rows: {dict(Counter(t['flag'] for t in truth.values()))}")


def export(out: Path, readers: list[str], to: Path, append: bool = False) -> None:
    """The readers' labels keyed by row hash, with the row's flag and source: the file the
    tables read (benchmarks/label_audit_reads.jsonl holds the session's two readers), so that
    the tables reproduce without the blind file's numbering. `append`: add the rows of `to`
    not read here (an earlier reading), the new reading winning where both have a row."""
    truth = json.loads((out / "truth.json").read_text())
    labels = []
    for reader in readers:
        got = {int(r["n"]): r["label"] for r in read_jsonl(out / reader)}
        missing = set(map(int, truth)) - set(got)
        if missing:
            raise SystemExit(f"{out}/{reader}: no label for rows {sorted(missing)[:10]}")
        labels.append(got)
    rows = {t["key"]: {**t, **{f"reader_{i + 1}": got[int(n)] for i, got in enumerate(labels)}}
            for n, t in truth.items()}
    if append:
        rows = {r["key"]: r for r in read_jsonl(to)} | rows
    write_jsonl(to, [rows[key] for key in sorted(rows)])


def audit(reads: list[dict], reader: int = 1) -> dict[str, str]:
    """key -> reader `reader`'s label (H, N or A)."""
    return {r["key"]: r[f"reader_{reader}"] for r in reads}


def agreement_table(reads: list[dict], reader: int) -> str:
    counts = Counter((r["flag"], r[f"reader_{reader}"]) for r in reads)
    lines = ["| flag | rows | reader H | reader N | reader A | reader confirms the flag |",
             "|---|---|---|---|---|---|"]
    for flag in ("unsafe", "control", "benign"):
        row = [counts[(flag, x)] for x in "HNA"]
        total = sum(row)
        lines.append(f"| {flag} | {total} | {row[0]} | {row[1]} | {row[2]} | "
                     f"{counts[(flag, AGREED[flag])] / total:.2f} |")
    return "\n".join(lines)


def default_and_mixed(run: Path, near: dict[str, float]) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """The run's rows (scores.jsonl, input order) with the mixed score it ranked by and the
    default's score (the margin alone, standardised as in the mix: the same ranking), recovered
    from the saved standard."""
    scoring = json.loads((run / "scorer" / "scoring.json").read_text())
    weight, (n_mean, n_spread) = scoring["neighbour_weight"], scoring["standard"]["nearness"]
    rows = [r for r in read_jsonl(run / "scores.jsonl") if "skipped" not in r]
    mixed = np.array([r["score"] for r in rows], dtype=float)
    z_near = (np.array([near[r["id"]] for r in rows]) - n_mean) / n_spread
    margin = (mixed - weight * z_near) / (1 - weight)
    floor = scoring["refusal_floor"]
    gated_rows = np.isclose(mixed, floor)
    margin[gated_rows] = margin[~gated_rows].min() - 1.0  # refusals rank last in both
    return rows, mixed, margin


def ranked(labels: np.ndarray, score: np.ndarray, keep: float, counted: np.ndarray) -> tuple:
    """(AUROC over the `counted` rows, their harmful rows removed, their controls kept) at `keep`
    of all rows: the selection drops its share of the whole file, disputed rows included."""
    m = metrics(labels, score, keep, counted)
    return m["auroc"], m["removed"], m["controls_kept"]


def read_back(mix: Path, run: Path, near_dir: Path) -> tuple[list[dict], np.ndarray, np.ndarray,
                                                             np.ndarray]:
    """For a dev mix and its --neighbour-weight run: the mix's rows the run scored (in its
    order), the run's mixed score, the default's score and the nearness, the last read from
    `benchmarks/neighbour_probe.py`'s rows of the mix in `near_dir`."""
    near = {r["id"]: r["seg_knn_10"] for r in read_jsonl(near_dir / f"{mix.stem}__neighbours.jsonl")}
    scored, mixed, margin = default_and_mixed(run, near)
    rows = read_jsonl(mix)
    return ([rows[r["index"]] for r in scored], mixed, margin,
            np.array([near[r["id"]] for r in scored]))


PARTS = ("flag", "agreed", "A as H")


def disputed_rows(flags: np.ndarray, read: list[str | None], ambiguous_harmful: bool) -> np.ndarray:
    """Rows whose flag the reader does not confirm: a harmful row read as not harmful (or, unless
    `ambiguous_harmful`, as ambiguous), a control read as harmful or ambiguous."""
    harmful_reads = ("H", "A") if ambiguous_harmful else ("H",)
    return np.array([(f == "unsafe" and x not in harmful_reads) or (f == "control" and x != "N")
                     for f, x in zip(flags, read, strict=True)])


def readers_table(reads: list[dict]) -> str:
    """How often the two readers give a row the same label, and Cohen's kappa, by flag."""
    from sklearn.metrics import cohen_kappa_score

    lines = ["| flag | rows | same label | Cohen's kappa |", "|---|---|---|---|"]
    for flag in ("unsafe", "control", "benign"):
        a = [r["reader_1"] for r in reads if r["flag"] == flag]
        b = [r["reader_2"] for r in reads if r["flag"] == flag]
        same = np.mean([x == y for x, y in zip(a, b, strict=True)])
        # kappa is undefined where both readers give every row one label
        kappa = f"{cohen_kappa_score(a, b):.2f}" if len(set(a) | set(b)) > 1 else "–"
        lines.append(f"| {flag} | {len(a)} | {same:.2f} | {kappa} |")
    return "\n".join(lines)


def table(reads: list[dict], runs: list[str], near_dir: Path, keep: float,
          reader: int = 1) -> str:
    """AUROC / harmful removed / controls kept of the default and of --neighbour-weight 0.5,
    against the flags, on the rows the reader agrees with, and counting ambiguous reads as
    harmful."""
    labels = audit(reads, reader)
    lines = ["| mix | harmful rows read N / A | " + " | ".join(
        f"{label}, {part}" for label in ("default", "w = 0.5") for part in PARTS) + " |",
        "|---" * (2 + 2 * len(PARTS)) + "|"]
    sums: dict[tuple[str, str], list] = {}
    for spec in runs:
        mix_path, run_dir = spec.split("=", 1)
        name = Path(mix_path).stem
        data, mixed, margin, _ = read_back(Path(mix_path), Path(run_dir), near_dir)
        flags = np.array([d["flag"] for d in data])
        read = [labels.get(row_key(d)) for d in data]
        counted = {"flag": np.ones(len(flags), dtype=bool),
                   "agreed": ~disputed_rows(flags, read, False),
                   "A as H": ~disputed_rows(flags, read, True)}
        cells = []
        for label, score in (("default", margin), ("w = 0.5", mixed)):
            for part in PARTS:
                m = ranked(flags, score, keep, counted[part])
                sums.setdefault((label, part), []).append(m)
                cells.append("{:.3f} / {:.2f} / {:.2f}".format(*m))
        of_harmful = Counter(x for f, x in zip(flags, read, strict=True) if f == "unsafe")
        lines.append(f"| {name} | {of_harmful['N']} / {of_harmful['A']} of "
                     f"{int((flags == 'unsafe').sum())}"
                     " | " + " | ".join(cells) + " |")
    lines.append(f"| **mean** (n={len(runs)}) | | " + " | ".join(
        "{:.3f} / {:.2f} / {:.2f}".format(*np.mean(sums[key], axis=0)) for key in sums) + " |")
    return "\n".join(lines)


def _kept_rows(path: str, data: str, rows: list[dict]) -> list[dict]:
    """The data rows a selection kept: a `selected.jsonl` (messages, matched to the data file's
    rows by request and answer) or a `scores.jsonl` (the data file's row indices, `kept`)."""
    selection = read_jsonl(path)
    if selection and "index" in selection[0] and "kept" in selection[0]:
        return [rows[r["index"]] for r in selection if r["kept"]]
    by_text = {(r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else ""), r["output"]):
               r for r in rows}
    kept = []
    for row in selection:
        user = "\n".join(m["content"] for m in row["messages"] if m["role"] == "user")
        source = by_text.get((user, row["messages"][-1]["content"]))
        if source is None:
            raise SystemExit(f"{path}: row {row['id']} is not a row of {data}")
        kept.append(source)
    return kept


def trained(data: str, selections: list[str], reads: list[dict], reader: int = 1) -> str:
    """Flagged harmful rows each selection trains on, split by the reader's label: which of the
    rows a selector keeps (or an oracle drops) are harmful by their text."""
    labels = audit(reads, reader)
    rows = read_rows(data)
    lines = ["| selection | flagged harmful rows trained | read H | read A | read N | not read |",
             "|---|---|---|---|---|---|"]
    for path in selections:
        counts: Counter = Counter()
        for source in _kept_rows(path, data, rows):
            if source["flag"] == "unsafe":
                counts[labels.get(row_key(source), "unread")] += 1
        lines.append(f"| {path} | {sum(counts.values())} | {counts['H']} | {counts['A']} | "
                     f"{counts['N']} | {counts['unread']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=["build", "export", "table", "trained"])
    p.add_argument("--out", type=Path, default=Path("runs/label_audit"),
                   help="build: where blind.jsonl and truth.json go; export: where they and "
                        "the readers' files are")
    p.add_argument("--mixes", nargs="*", default=[])
    p.add_argument("--benign", type=int, default=40, help="benign rows read as a check")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--readers", nargs="*", default=["labels.jsonl", "labels2.jsonl"],
                   help="export: the readers' files in --out, in order")
    p.add_argument("--reads", type=Path, default=READS, help="export writes it, table reads it")
    p.add_argument("--skip-mixes", nargs="*", default=[],
                   help="build: leave out flagged rows of these mixes (an earlier reading's)")
    p.add_argument("--append", action="store_true",
                   help="export: add to --reads instead of replacing it")
    p.add_argument("--reader", type=int, default=1, help="table: whose labels score the runs")
    p.add_argument("--run", nargs="*", default=[], help="MIX.jsonl=SELECT_RUN_DIR")
    p.add_argument("--near", type=Path, default=Path("runs/neighbour_probe"))
    p.add_argument("--keep", type=float, default=0.8)
    p.add_argument("--data", help="trained: the fine-tuning file the selections drew from")
    p.add_argument("--selected", nargs="*", default=[],
                   help="trained: the selections' selected.jsonl or scores.jsonl files")
    a = p.parse_args()
    if a.step == "build":
        before = {row_key(r) for path in a.skip_mixes for r in read_jsonl(path)}
        build(a.mixes, a.out, a.benign, a.seed, before)
    elif a.step == "export":
        export(a.out, a.readers, a.reads, append=a.append)
    elif a.step == "trained":
        print(trained(a.data, a.selected, read_jsonl(a.reads), a.reader))
    else:
        reads = read_jsonl(a.reads)
        print(agreement_table(reads, a.reader), "\n")
        if "reader_2" in reads[0]:
            print(readers_table(reads), "\n")
        print(table(reads, a.run, a.near, a.keep, a.reader))


if __name__ == "__main__":
    main()
