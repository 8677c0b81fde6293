"""The README's scale table: the smallest TPU slice of each chip that fits a TOFU-sized run.

For each model preset, chip and pass, :func:`jaxunlearn.plan.smallest_slice` compiles the pass
with the real XLA:TPU compiler (libtpu, no TPU attached) on slices of that chip, smallest first by
bisection, until the per-chip peak (XLA's memory analysis) fits the chip's HBM. The run is
TOFU-sized: NPO + orthogonal projection over ``k = 4`` retain gradients, AdamW, the frozen
reference, batch 32 x 512 tokens, bfloat16 parameters (float32 Fisher accumulator); the Fisher
pass is one batch of the fused diagonal-Fisher accumulation. Every compiled plan (fitting or
not) is appended to ``<out>/tries.jsonl``, each search's answer written to
``<out>/<model>_<chip>_<pass>.json`` (a search whose file exists is skipped: the script resumes),
and the table printed as markdown. Compiles take minutes each on a 2-core machine: run it alone.

Usage: ``python experiments/scale_table.py [--models llama-2-7b,llama-3-8b] [--chips v5e,v5p]
[--passes unlearn,fisher] [--remat none] [--out results/scale] [--table-only]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from jaxunlearn.plan import CHIPS, GiB, smallest_slice


def _summary(result, chip: str) -> dict:
    d = result.to_dict()
    p = next(iter(d["passes"].values()))
    return {"target": d["target"], "chips": _chips(d["target"]), "mesh": d["mesh"],
            "peak_gib": p["peak_bytes"] / GiB, "argument_gib": p["argument_bytes"] / GiB,
            "temp_gib": p["temp_bytes"] / GiB, "tflop": p["flops"] / 1e12,
            "collective_gib": sum(c["wire_bytes"] for c in p["collectives"].values()) / GiB,
            "roofline_s": p["roofline_seconds"], "compile_s": p["compile_seconds"],
            "fits": d["fits"][chip], "error": p["error"]}


def _chips(target: str) -> int:
    n = 1
    for s in target.split(":")[1].split("x"):
        n *= int(s)
    return n


def search(model: str, chip: str, pass_: str, *, remat: str, out: Path, timeout: float = 3600.0) -> dict:
    """One smallest-slice search; its answer (``{"found": None}`` when no listed slice fits) is saved."""
    path = out / f"{model}_{chip}_{pass_}_{remat}.json"
    if path.exists():
        return json.loads(path.read_text())

    def log(result):
        row = {"model": model, "pass": pass_, "remat": remat, **_summary(result, chip)}
        with open(out / "tries.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        what = (f"peak {row['peak_gib']:.1f} GiB ({'fits' if row['fits'] else 'no'})" if row["error"] is None
                else f"refused: {row['error'].splitlines()[0][:200]}")
        print(f"  {model} {pass_} on {row['target']} mesh {row['mesh']}: {what}, compiled in {row['compile_s']:.0f} s",
              flush=True)

    t0 = time.perf_counter()
    found = smallest_slice(model, chip, passes=(pass_,), batch=32, seq=512, method="npo_proj", retain_k=4,
                           param_dtype="bfloat16", remat=remat, on_plan=log, timeout=timeout)
    answer = {"model": model, "chip": chip, "pass": pass_, "remat": remat, "seconds": time.perf_counter() - t0,
              "found": None if found is None else _summary(found, chip)}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(answer, indent=1))
    tmp.replace(path)
    return answer


def table(answers: list[dict]) -> str:
    rows = ["| model | pass | remat | chip (HBM) | smallest slice | mesh | peak GiB per chip | TFLOP per chip "
            "| collectives GiB sent | roofline bound |", "|---|---|---|---|---|---|---|---|---|---|"]
    for a in answers:
        f, chip = a["found"], a["chip"]
        head = f"| {a['model']} | {a['pass']} | {a['remat']} | {chip} ({CHIPS[chip].hbm_bytes / GiB:.0f} GiB) |"
        if f is None:
            rows.append(head + " none listed fits | | | | | |")
            continue
        mesh = ",".join(f"{k}={v}" for k, v in f["mesh"].items())
        bound = "-" if f["roofline_s"] is None else f">= {f['roofline_s']:.2f} s"
        rows.append(head + f" {f['target']} ({f['chips']} chips) | {mesh} | {f['peak_gib']:.1f} | {f['tflop']:.1f} "
                           f"| {f['collective_gib']:.0f} | {bound} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-2-7b,llama-3-8b")
    ap.add_argument("--chips", default="v5e,v5p")
    ap.add_argument("--passes", default="unlearn,fisher")
    ap.add_argument("--remat", default="none", choices=("none", "full", "dots_saveable"))
    ap.add_argument("--out", default="results/scale")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per compile subprocess")
    ap.add_argument("--table-only", action="store_true", help="print the table of the searches already saved")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    answers = []
    for model in args.models.split(","):
        for chip in args.chips.split(","):
            for pass_ in args.passes.split(","):
                path = out / f"{model}_{chip}_{pass_}_{args.remat}.json"
                if args.table_only:
                    if path.exists():
                        answers.append(json.loads(path.read_text()))
                    continue
                print(f"{model} {pass_} on {chip} (remat {args.remat})", flush=True)
                answers.append(search(model, chip, pass_, remat=args.remat, out=out, timeout=args.timeout))
    print(table(answers))


if __name__ == "__main__":
    main()
