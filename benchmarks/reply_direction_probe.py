"""Research probe (not the product): a "more harmful reply" direction in a sentence encoder's
space, learned from Anthropic HH preference pairs, as a signal that reads what a row's *answer*
does rather than how its request sounds.

The controls the selector loses are safe rows whose request sounds dangerous (XSTest): the
request's nearness to the safe set and the proxy's refusal margin both read the request. HH's
harmless pairs are two replies to one and the same dialogue, one judged more harmful; the
difference of their embeddings cancels the topic. A linear direction fitted to those
differences (logistic regression without intercept, both signs) scores any reply. Settings were
fixed before any mix was scored (runs/reply_direction_prereg.md): all-MiniLM-L6-v2 as the
nearness uses it, C = 1, the final reply of every pair.

    python benchmarks/reply_direction_probe.py --out runs/reply_direction \
        --hh ../shared/data/safe/hh_rlhf_harmless_base_test.jsonl.gz --run \
        runs/dev_mixes/alpaca-xstest_s0.jsonl=runs/sweep_neighbours/neighbours-0.5-alpaca-xstest_s0-s0

`--run` pairs a dev mix with its `sealft select --neighbour-weight 0.5` run, from which the
margin and the nearness are read back (`label_audit.default_and_mixed`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from sealft.data import pairs_from_rows, read_rows
from sealft.embeddings import SentenceEncoder
from sealft.io import read_jsonl
from sealft.neighbours import mix
from sealft.refusal import is_refusal
from sealft.selector import spread

sys.path.insert(0, str(Path(__file__).resolve().parent))
from judge_probe import gated, signal_table  # noqa: E402
from label_audit import READS, audit, disputed_rows, read_back, row_key  # noqa: E402


def fit_direction(chosen: np.ndarray, rejected: np.ndarray, c: float = 1.0) -> np.ndarray:
    """Unit-free weights w with w·e(rejected) > w·e(chosen) for as many pairs as a linear
    ranker can: logistic regression on the differences, both signs, no intercept."""
    diff = rejected - chosen
    x = np.concatenate([diff, -diff])
    y = np.concatenate([np.ones(len(diff)), np.zeros(len(diff))])
    model = LogisticRegression(C=c, fit_intercept=False, max_iter=1000).fit(x, y)
    return model.coef_[0]


def hh_replies(path: str, encoder: SentenceEncoder) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of the final chosen and rejected replies of every pair (identical ones left
    out, as the DPO upper level leaves them out)."""
    pairs = pairs_from_rows(read_rows(path), path)
    chosen = encoder.embed([c["messages"][-1]["content"] for c, _ in pairs]).numpy()
    rejected = encoder.embed([r["messages"][-1]["content"] for _, r in pairs]).numpy()
    return chosen, rejected


def held_out_accuracy(chosen: np.ndarray, rejected: np.ndarray, seed: int = 0) -> float:
    """Share of a seeded 20% of pairs that a direction fitted on the other 80% orders right."""
    order = np.random.default_rng(seed).permutation(len(chosen))
    test, train = order[: len(order) // 5], order[len(order) // 5:]
    w = fit_direction(chosen[train], rejected[train])
    return float(((rejected[test] - chosen[test]) @ w > 0).mean())


def mix_scores(mix_path: str, run_dir: str, near_dir: Path, w: np.ndarray,
               encoder: SentenceEncoder, labels: dict[str, str] | None) -> tuple:
    """(mix name, flags, mask of the rows reader 1 confirms or None, signals by name)."""
    data, mixed, margin, near = read_back(Path(mix_path), Path(run_dir), near_dir)
    flags = np.array([d["flag"] for d in data])
    refuses = np.array([is_refusal(d["output"]) for d in data])
    reply = encoder.embed([d["output"] for d in data]).numpy() @ w

    def z(x: np.ndarray) -> torch.Tensor:
        x = torch.tensor(x)
        return (x - x.mean()) / spread(x)

    near_hh, _ = mix(torch.tensor(near), torch.tensor(reply), 0.5)
    signals = {"margin (default)": margin, "w = 0.5 (margin + near)": mixed,
               "hh_pair": gated(reply, refuses),
               "near+hh": gated(near_hh.numpy(), refuses),
               "margin+near+hh": gated(((z(margin) + z(near) + z(reply)) / 3).numpy(), refuses)}
    agreed = None
    if labels is not None:
        agreed = ~disputed_rows(flags, [labels.get(row_key(d)) for d in data], False)
    return Path(mix_path).stem, flags, agreed, signals


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hh", default="../shared/data/safe/hh_rlhf_harmless_base_test.jsonl.gz")
    p.add_argument("--run", nargs="*", default=[], help="MIX.jsonl=SELECT_RUN_DIR (w = 0.5)")
    p.add_argument("--near", type=Path, default=Path("runs/neighbour_probe"))
    p.add_argument("--reads", type=Path, default=READS,
                   help="label_audit.py's readers: also score the rows reader 1 confirms")
    p.add_argument("--out", type=Path, default=Path("runs/reply_direction"))
    a = p.parse_args()
    encoder = SentenceEncoder()
    a.out.mkdir(parents=True, exist_ok=True)
    chosen, rejected = hh_replies(a.hh, encoder)
    print(f"HH pairs: {len(chosen)}; held-out pairwise accuracy of the direction: "
          f"{held_out_accuracy(chosen, rejected):.3f}")
    w = fit_direction(chosen, rejected)
    np.save(a.out / "direction.npy", w)
    labels = audit(read_jsonl(a.reads)) if a.reads.exists() else None
    results = [mix_scores(m, r, a.near, w, encoder, labels)
               for m, r in (spec.split("=", 1) for spec in a.run)]
    names = list(results[0][3])
    mixes = [(name, flags, signals) for name, flags, _, signals in results]
    print(signal_table(mixes, names, names))
    if labels is not None:
        print("\nrows the reader agrees with (disputed rows out of the AUROC and the counts):")
        print(signal_table(mixes, names, names, counted=[agreed for *_, agreed, _ in results]))


if __name__ == "__main__":
    main()
