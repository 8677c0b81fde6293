"""Write the embedded benchmark as a user's question/answer-only QA files (the README's "Your own data").

    python experiments/own_data_example.py results/mydata
    jaxunlearn demo --data results/mydata --general world_facts --size tiny --out results/own_demo

The splits forget10, retain90 and holdout and the general questions (as ``world_facts``) of the
synthetic benchmark the demo generates (``DemoConfig()``'s sizes and seed), each as JSON lines with
only ``question`` and ``answer``: what a user with plain QA data has (no paraphrased or perturbed
answers, no fact masks).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jaxunlearn.data import generate_benchmark
from jaxunlearn.pipeline import DemoConfig


def main(out: str) -> None:
    cfg = DemoConfig()
    dd = generate_benchmark(num_people=cfg.num_people, num_general=cfg.num_general, seed=cfg.seed)
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    for split, name in (("forget10", "forget10"), ("retain90", "retain90"), ("holdout", "holdout"),
                        ("general", "world_facts")):
        with open(path / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in dd[split]:
                f.write(json.dumps({"question": row["question"], "answer": row["answer"]}) + "\n")
    print(f"wrote {', '.join(sorted(p.name for p in path.glob('*.jsonl')))} to {path}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/mydata")
