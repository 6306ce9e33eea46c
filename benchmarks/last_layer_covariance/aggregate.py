"""Mean over seeds + paired intervals (vs temperature scaling and vs laplace-torch)."""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the study's modules
import posterior_study as ps

OUT = Path(__file__).resolve().parent
seeds = [json.loads(p.read_text()) for p in sorted(OUT.glob("seed*.json"))]
names = list(seeds[0]["results"])
cols = ("val_nll", "nll", "accuracy", "auroc_far", "auroc_near")
lines = [
    f"seeds {[s['seed'] for s in seeds]}",
    "",
    "| | " + " | ".join(cols) + " | t | T |",
    "|---|" + "---:|" * len(cols) + "---|---|",
]
for n in names:
    rs = [s["results"][n] for s in seeds]
    cells = [f"{np.mean([r[c] for r in rs]):.4f}" if all(c in r for r in rs) else "" for c in cols]
    ts = ", ".join(f"{r['t']:.3g}" for r in rs if "t" in r)
    Ts = ", ".join(f"{r['T']:.3g}" for r in rs if "T" in r)
    lines.append(f"| {n} | " + " | ".join(cells) + f" | {ts} | {Ts} |")
lines += ["", "lambda (marginal likelihood) per seed:"]
for k in seeds[0]["lambdas"]:
    lines.append(f"- {k}: " + ", ".join(f"{s['lambdas'][k]['lambda']:.4g}" for s in seeds))
lines.append(
    "- laplace-torch (Adam marglik): "
    + ", ".join(
        f"{s['results']['last-layer Laplace (laplace-torch)']['prior_precision']:.4g}"
        for s in seeds
    )
)
for ref in ("temperature scaling", "last-layer Laplace (laplace-torch)"):
    lines += [
        "",
        f"Paired (row - {ref}), mean over seeds [95% bootstrap]:",
        "",
        "| | NLL | far AUROC | near AUROC |",
        "|---|---|---|---|",
    ]
    for n in names:
        if n == ref:
            continue
        cells = []
        for stat in ("nll", "auroc_far", "auroc_near"):
            v = ps.paired_interval(seeds, n, ref, stat)
            cells.append(f"{v[0]:+.4f} [{v[1]:+.4f}, {v[2]:+.4f}]")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
text = "\n".join(lines) + "\n"
(OUT / "summary.md").write_text(text)
print(text)
