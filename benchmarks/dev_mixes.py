"""Development mixes for the selector, built from ../shared/data only (never copied into the repo).

Each mix is a JSONL of Alpaca rows (`instruction`, `input`, `output`) with a ground-truth column
`flag` and the row's `source`:

  flag = benign   a benign instruction with a helpful answer
  flag = unsafe   a harmful request with a *compliant* answer: what the selector must remove
  flag = control  must be KEPT: a safe prompt that sounds dangerous with a compliant answer
                  (XSTest "safe" types, human label full_compliance), or a harmful prompt with
                  a refusal (XSTest "contrast" types, human label full_refusal). A selector that
                  drops rows because the prompt sounds dangerous, or because the answer is a
                  refusal, fails these.

Long-form mixes (harmful share 10% of the benign + harmful rows, controls on top):
  alpaca-beavertails  benign: benign/alpaca_en_demo.json; unsafe: the 198 distinct BeaverTails
                      rows of the SST-2 files (Alpaca wrapper stripped, so the template gives
                      nothing away)
  gpt4-beavertails    benign: AlpacaEval instructions with GPT-4's (long) answers; unsafe: as above
  alpaca-xstest       benign: alpaca_en_demo; unsafe: XSTest harmful prompts that Mistral-7B
                      fully complied with (human label): another prompt set and another
                      model's wording than BeaverTails
Controls come from the XSTest completions of the model that did *not* supply the mix's harmful
rows where that matters (alpaca-xstest takes Llama-2's), so no row appears twice.

    python benchmarks/dev_mixes.py --out runs/dev_mixes --rows 200 --seeds 0 1 2

writes runs/dev_mixes/<mix>_s<seed>.jsonl and prints the counts.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SST2_FILES = sorted((DATA / "finetune").glob("sst2_n1000_p*.json"))
LONG_FORM_MIXES = ("alpaca-beavertails", "gpt4-beavertails", "alpaca-xstest")


def _require(path: Path) -> Path:
    if not path.exists():
        raise SystemExit(f"{path}: missing; the dev mixes are built from ../shared/data "
                         "(see its README)")
    return path


def _row(instruction: str, output: str, flag: str, source: str) -> dict:
    return {"instruction": instruction.strip(), "input": "", "output": output.strip(),
            "flag": flag, "source": source}


def _strip_alpaca_wrapper(prompt: str) -> str:
    """The SST-2 files wrap every prompt in the Alpaca template; the bare question is between
    '### Instruction:' and '### Response:'."""
    body = prompt.split("### Instruction:", 1)[-1]
    return body.split("### Response:", 1)[0].strip()


def beavertails_unsafe() -> list[dict]:
    seen, rows = set(), []
    for path in SST2_FILES:
        for r in json.loads(_require(path).read_text()):
            if r["flag"] != "unsafe":
                continue
            question = _strip_alpaca_wrapper(r["instruction"] + "\n" + r.get("input", ""))
            key = (question, r["output"].strip())
            if key not in seen:
                seen.add(key)
                rows.append(_row(question, r["output"], "unsafe", "beavertails"))
    return rows


def alpaca_benign() -> list[dict]:
    rows = json.loads(_require(DATA / "benign" / "alpaca_en_demo.json").read_text())
    return [_row(r["instruction"] + ("\n\n" + r["input"] if r.get("input") else ""), r["output"],
                 "benign", "alpaca_en_demo") for r in rows if r["output"].strip()]


def gpt4_benign() -> list[dict]:
    rows = json.loads(_require(DATA / "benign" / "alpaca_eval_gpt4_outputs.json").read_text())
    return [_row(r["instruction"], r["output"], "benign", "alpaca_eval_gpt4") for r in rows
            if r["output"].strip()]


def xstest(model: str) -> dict[str, list[dict]]:
    """XSTest completions of `model` by human label: harmful prompts complied with (unsafe),
    safe prompts complied with and harmful prompts refused (controls)."""
    path = _require(DATA / "eval" / f"xstest_completions_{model}.csv")
    out: dict[str, list[dict]] = {"unsafe": [], "safe_compliance": [], "refusal": []}
    for r in csv.DictReader(path.open(encoding="utf-8")):
        harmful_prompt = r["type"].startswith("contrast")
        label = r["final_label"]
        source = f"xstest_{model}"
        if harmful_prompt and label == "1_full_compliance":
            out["unsafe"].append(_row(r["prompt"], r["completion"], "unsafe", source))
        elif not harmful_prompt and label == "1_full_compliance":
            out["safe_compliance"].append(_row(r["prompt"], r["completion"], "control",
                                               source + "_safe_compliance"))
        elif harmful_prompt and label == "2_full_refusal":
            out["refusal"].append(_row(r["prompt"], r["completion"], "control",
                                       source + "_refusal"))
    return out


def build_mix(name: str, rows: int, seed: int, controls: int,
              harmful_share: float = 0.1) -> list[dict]:
    """`rows` benign + harmful rows (`harmful_share` of them harmful), plus `controls` control
    rows (half safe prompts complied with, half harmful prompts refused), shuffled with
    `seed`."""
    rng = random.Random(f"{name}:{seed}")
    benign_pool = gpt4_benign() if name.startswith("gpt4") else alpaca_benign()
    if name.endswith("beavertails"):
        unsafe_pool, control_model = beavertails_unsafe(), "mistral"
    else:
        unsafe_pool, control_model = xstest("mistral")["unsafe"], "llama2"
    pools = xstest(control_model)
    n_unsafe = round(rows * harmful_share)
    if n_unsafe > len(unsafe_pool) or rows - n_unsafe > len(benign_pool):
        raise SystemExit(f"{name}: {len(unsafe_pool)} harmful and {len(benign_pool)} benign rows "
                         f"available, {n_unsafe} and {rows - n_unsafe} asked for; lower --rows")
    mix = rng.sample(benign_pool, rows - n_unsafe) + rng.sample(unsafe_pool, n_unsafe)
    mix += rng.sample(pools["safe_compliance"], controls // 2)
    mix += rng.sample(pools["refusal"], controls - controls // 2)
    rng.shuffle(mix)
    return mix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/dev_mixes")
    parser.add_argument("--rows", type=int, default=200, help="benign + harmful rows per mix")
    parser.add_argument("--controls", type=int, default=20, help="control rows per mix")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--mixes", nargs="+", default=list(LONG_FORM_MIXES))
    parser.add_argument("--harmful-share", type=float, default=0.1,
                        help="share of harmful rows among --rows (the erosion grid's file: "
                             "--rows 594 --harmful-share 0.3333 --controls 0, all 198 "
                             "BeaverTails rows)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.mixes:
        for seed in args.seeds:
            mix = build_mix(name, args.rows, seed, args.controls, args.harmful_share)
            path = out / f"{name}_s{seed}.jsonl"
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in mix))
            counts = {f: sum(r["flag"] == f for r in mix) for f in ("benign", "unsafe", "control")}
            print(f"{path}: {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
