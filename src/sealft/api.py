"""SEAL from Python: a small object with verbs, in the style of DSIR's `data-selection`.

    from sealft import SealSelector

    selector = SealSelector(safe_data="safe.json", epochs=1, batch_size=16, lr=1e-4)
    selector.fit("train.jsonl")              # bilevel fit + scoring pass; a run dir like `select`'s
    weights = selector.scores()              # one weight per input row (NaN: unusable row)
    kept_rows = selector.select(keep_ratio=0.8)
    selector.save("runs/my-selector")
    again = SealSelector.load("runs/my-selector")
    harm = again.score("more_rows.jsonl")    # rows it never saw: forward passes only

`fit` runs the same stage as `sealft select` (`run_select`), so the CLI, the demo and this
object share one implementation; options are `SelectArgs` fields.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from sealft import config as cfg
from sealft.errors import ConfigError
from sealft.io import read_jsonl
from sealft.selection_run import SelectArgs

ROWS_FILE = "rows.jsonl"
"""The rows `fit` was given as a list, kept inside the run dir (where `select` reads them)."""
# What a fitted selector is made of; `save` copies these and nothing else.
RUN_FILES = ("config.yaml", "scores.jsonl", "selector.safetensors", "summary.json", "scorer",
             ROWS_FILE)


class SealSelector:
    """A SEAL data selector. Options are `SelectArgs` fields (model, safe_data,
    algorithm, epochs, ...); `run_dir` is where `fit` writes (default: a new temp dir)."""

    def __init__(self, run_dir: str | Path | None = None, **options: Any):
        self.options = options
        self.run_dir = Path(run_dir) if run_dir else None
        self._scorer = None

    def fit(self, data: str | Path | list[dict]) -> SealSelector:
        """Learn the selector on `data` (a file or dataset `sealft select` reads, or a list of
        rows in any supported format) and score every row."""
        run = self.run_dir or Path(tempfile.mkdtemp(prefix="sealft-selector-"))
        if isinstance(data, list):
            self._fit_rows(run, data)
        else:
            self._run_select(run, str(data))
        self.run_dir = run
        return self

    def _run_select(self, run: Path, data: str) -> None:
        from sealft.select import run_select

        run_select(cfg.build(SelectArgs, self.options, {"finetune_data": data,
                                                        "output_dir": str(run)}))

    def _fit_rows(self, run: Path, rows: list[dict]) -> None:
        """Fit on in-memory rows: `select` reads a file, and the run dir must be empty when it
        starts, so the rows go to a temp file first and into the run dir once it is a run."""
        from sealft.io import record_output, track, write_jsonl, write_yaml

        with tempfile.TemporaryDirectory(prefix="sealft-rows-") as tmp:
            staged = Path(tmp) / ROWS_FILE
            write_jsonl(staged, rows)
            self._run_select(run, str(staged))
            track(run, "select")
            record_output(run, ROWS_FILE)  # --overwrite of this run dir removes them too
            shutil.move(staged, run / ROWS_FILE)
        saved = _saved_config(run)
        saved["finetune_data"] = str((run / ROWS_FILE).resolve())  # the temp path is gone
        write_yaml(run / "config.yaml", saved)

    def _fitted(self) -> Path:
        if self.run_dir is None or not (self.run_dir / "scores.jsonl").is_file():
            raise ConfigError("SealSelector: call fit(data) (or SealSelector.load(dir)) first")
        return self.run_dir

    def scores(self) -> np.ndarray:
        """The fitted rows' weights, in input order (higher = keep; NaN = unusable row)."""
        rows = read_jsonl(self._fitted() / "scores.jsonl")
        return np.array([np.nan if r["weight"] is None else r["weight"] for r in rows])

    def select(self, keep_ratio: float | None = None, keep_count: int | None = None) -> list[dict]:
        """The kept rows (normalised, with their ids). Without arguments: the fit's own
        selection; otherwise the top `keep_ratio` share or `keep_count` rows by weight."""
        from sealft.selector import top_by_weight

        run = self._fitted()
        scores = read_jsonl(run / "scores.jsonl")
        if keep_ratio is None and keep_count is None:
            kept = {r["id"] for r in scores if r["kept"]}
        else:
            mask = top_by_weight(scores, keep_ratio, keep_count)
            kept = {r["id"] for r, keep in zip(scores, mask, strict=True) if keep}
        from sealft.data import load_examples

        args = cfg.build(SelectArgs, _saved_config(run))
        # Rows fitted from a list travel with the run dir (also into `save`'s copy).
        data = run / ROWS_FILE if (run / ROWS_FILE).is_file() else args.finetune_data
        examples = load_examples(str(data), args.split, args.format, args.limit,
                                 args.drop_duplicates)
        return [{"id": e["id"], "messages": e["messages"], **e["meta"]}
                for e in examples if e["id"] in kept]

    def save(self, directory: str | Path) -> Path:
        """Copy the fitted selector (config, scores, logits, scorer) to `directory`."""
        run, target = self._fitted(), Path(directory)
        if target.resolve() == run.resolve():
            return target
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            # Copying into it would replace files of the same names that sealft did not write.
            raise ConfigError(f"SealSelector.save: {target} exists and is not empty; "
                              "choose a new directory")
        target.mkdir(parents=True, exist_ok=True)
        for name in RUN_FILES:
            source = run / name
            if source.is_dir():
                shutil.copytree(source, target / name, dirs_exist_ok=True)
            elif source.is_file():
                shutil.copy2(source, target / name)
        return target

    @classmethod
    def load(cls, directory: str | Path) -> SealSelector:
        run = Path(directory)
        selector = cls(run_dir=run, **_saved_config(run))
        selector._fitted()
        return selector

    def score(self, data: str | Path | list[dict]) -> np.ndarray:
        """Harm score of each row of `data` under the fitted scorer (higher = more harmful,
        NaN = unusable), with forward passes only; the model stays loaded between calls."""
        from sealft.data import load_examples, normalise
        from sealft.score import fitted_select_args
        from sealft.seal import load_scorer, score_examples

        run = self._fitted()
        fitted, scoring = fitted_select_args(run)
        if self._scorer is None:
            self._scorer = load_scorer(run, fitted, scoring)
        examples = normalise(data, "rows") if isinstance(data, list) else load_examples(str(data))
        scores, _ = score_examples(self._scorer, examples, show_progress=False)
        return scores


def _saved_config(run: Path) -> dict:
    import yaml

    path = run / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run}: no config.yaml; not a `sealft select` run dir")
    return yaml.safe_load(path.read_text())
