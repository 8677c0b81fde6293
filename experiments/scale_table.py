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
[--passes unlearn,fisher] [--remat none] [--tp 1] [--out results/scale] [--table-only]``
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from jaxunlearn.plan import CHIPS, GiB, parse_target, smallest_slice


def _summary(result, chip: str) -> dict:
    d = result.to_dict()
    p = next(iter(d["passes"].values()))
    return {"target": d["target"], "chips": _chips(d["target"]), "mesh": d["mesh"],
            "peak_gib": p["peak_bytes"] / GiB, "argument_gib": p["argument_bytes"] / GiB,
            "temp_gib": p["temp_bytes"] / GiB, "tflop": p["flops"] / 1e12,
            "collective_gib": sum(c["wire_bytes"] for c in p["collectives"].values()) / GiB,
            "roofline_s": p["roofline_seconds"], "compile_s": p["compile_seconds"],
            "fits": d["fits"][chip], "error": p["error"]}


def _name(model: str, chip: str, pass_: str, remat: str, tp: int) -> str:
    return f"{model}_{chip}_{pass_}_{remat}" + (f"_tp{tp}" if tp != 1 else "") + ".json"


def _chips(target: str) -> int:
    return parse_target(target).num_devices


def search(model: str, chip: str, pass_: str, *, remat: str, out: Path, tp: int = 1,
           timeout: float = 3600.0) -> dict:
    """One smallest-slice search; its answer (``{"found": None}`` when no listed slice fits) is saved."""
    path = out / _name(model, chip, pass_, remat, tp)
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
                           param_dtype="bfloat16", remat=remat, tp=tp, on_plan=log, timeout=timeout)
    answer = {"model": model, "chip": chip, "pass": pass_, "remat": remat, "min_tp": tp, "seconds": time.perf_counter() - t0,
              "found": None if found is None else _summary(found, chip)}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(answer, indent=1))
    tmp.replace(path)
    return answer


def _mesh(m: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in m.items())


def _below(a: dict, tries: list[dict]) -> str:
    """The largest compiled slice under the answer that did not fit, and why."""
    n = a["found"]["chips"] if a["found"] else float("inf")
    tp = a.get("min_tp", 1)
    over = [t for t in tries if t["model"] == a["model"] and t["pass"] == a["pass"] and t["remat"] == a["remat"]
            and t["target"].startswith(a["chip"] + ":") and not t["fits"] and t["chips"] < n
            and t["mesh"].get("tp", 1) >= tp]
    if not over:
        return "-"
    t = max(over, key=lambda t: t["chips"])
    m = re.search(r"required for ([\w ]+?) \((\S+)\) exceeds available HBM \((\S+)\)", t["error"] or "")
    why = (f"peak {t['peak_gib']:.1f} GiB" if t["error"] is None else
           f"XLA: {m.group(1).replace('HLO ', '')} {m.group(2)} > HBM {m.group(3)}" if m else
           "refused by XLA: " + t["error"].splitlines()[0][:90])
    return f"{t['target']} ({_mesh(t['mesh'])}): {why}"


def table(answers: list[dict], tries: list[dict]) -> str:
    rows = ["| model | pass | chip (HBM) | smallest slice that fits | mesh | peak GiB per chip | TFLOP per chip "
            "| collectives GiB sent | roofline bound | next smaller slice compiled |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for a in answers:
        f, chip = a["found"], a["chip"]
        name = a["pass"] + ("" if a["remat"] == "none" else f", remat {a['remat']}")
        head = f"| {a['model']} | {name} | {chip} ({CHIPS[chip].hbm_bytes / GiB:.0f} GiB) |"
        if f is None:
            rows.append(head + f" none listed fits | | | | | | {_below(a, tries)} |")
            continue
        bound = "-" if f["roofline_s"] is None else f">= {f['roofline_s']:.2f} s"
        rows.append(head + f" {f['target']} ({f['chips']} chips) | {_mesh(f['mesh'])} | {f['peak_gib']:.1f} "
                           f"| {f['tflop']:.1f} | {f['collective_gib']:.0f} | {bound} | {_below(a, tries)} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-2-7b,llama-3-8b")
    ap.add_argument("--chips", default="v5e,v5p")
    ap.add_argument("--passes", default="unlearn,fisher")
    ap.add_argument("--remat", default="none", choices=("none", "full", "dots_saveable"))
    ap.add_argument("--out", default="results/scale")
    ap.add_argument("--tp", type=int, default=1, help="the least tensor-parallel size of each mesh")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per compile subprocess")
    ap.add_argument("--table-only", action="store_true", help="print the table of the searches already saved")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    answers = []
    for model in args.models.split(","):
        for chip in args.chips.split(","):
            for pass_ in args.passes.split(","):
                path = out / _name(model, chip, pass_, args.remat, args.tp)
                if args.table_only:
                    if path.exists():
                        answers.append(json.loads(path.read_text()))
                    continue
                print(f"{model} {pass_} on {chip} (remat {args.remat})", flush=True)
                answers.append(search(model, chip, pass_, remat=args.remat, out=out, tp=args.tp, timeout=args.timeout))
    log = out / "tries.jsonl"
    tries = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    print(table(answers, tries))


if __name__ == "__main__":
    main()
