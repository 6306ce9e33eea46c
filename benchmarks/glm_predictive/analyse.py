"""Stage 2: for each predictive, (t, T) by validation NLL; evaluate test / far / near."""

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # posterior_study, beside this folder
import last_layer_predictives as llp
import numpy as np
import posterior_study as ps
import torch

from bnnconvert.calibration import fit_temperature, predictive_nll
from bnnconvert.predict import Prediction

OUT = Path(__file__).resolve().parent
CKPT = Path(__file__).resolve().parents[1] / "posterior_study"
SCALES = (0.0, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 2**-0.5, 1.0, 2**0.5, 2.0, 2 * 2**0.5, 4.0, 8.0)
SL = {
    "val": slice(0, 500),
    "test": slice(500, 1000),
    "ood": slice(1000, 1500),
    "near": slice(1500, 2000),
}


def outputs(kind, c, t, part):
    """(S, n, C) logits of predictive `kind` at scale t on `part`."""
    f = c["f"][SL[part]].double()
    if kind == "temperature scaling" or t == 0:
        return f[None]
    if "probit" in kind:
        var = c["var_grad2"] if kind.startswith("grad2") else c["var_exact_last"]
        return (f / (1 + math.pi / 8 * t**2 * var[SL[part]].double()).sqrt())[None]
    noise = c["jd_grad2"] if kind.startswith("grad2") else c["noise_last"]
    return f[None] + t * noise[:, SL[part]].double()


def prediction(z, T):
    logp = (z / T).log_softmax(2)
    p_s = logp.exp()
    p = p_s.mean(0)
    ent = -(p * p.clamp_min(1e-30).log()).sum(1)
    exp_ent = -(p_s * logp).sum(2).mean(0)
    return Prediction(
        p.float(),
        p_s.var(0, unbiased=False).float(),
        entropy=ent.float(),
        expected_entropy=exp_ent.float(),
        mutual_info=(ent - exp_ent).float(),
    )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    a = p.parse_args()
    torch.set_num_threads(1)
    sets = ps.load_sets(False)
    kinds = (
        "temperature scaling",
        "grad2, GLM probit",
        "grad2, GLM MC",
        "last layer, probit (exact var)",
        "last layer, GLM MC",
    )
    seeds = []
    for seed in a.seeds:
        c = torch.load(OUT / f"cache_seed{seed}.pt")
        c["var_grad2"] = (c["jd_grad2"].double() ** 2).mean(0)
        g = torch.Generator().manual_seed(20_000 + seed)
        S = c["jd_grad2"].shape[0]
        c["noise_last"] = c["var_exact_last"].double().sqrt() * torch.randn(
            S, *c["f"].shape, generator=g, dtype=torch.float64
        )
        yv, yt = c["y_val"], c["y_test"]
        results, items, curves = {}, {}, {}
        for kind in kinds:
            rows = []
            for t in SCALES[:1] if kind == "temperature scaling" else SCALES:
                zv = outputs(kind, c, t, "val")
                T = fit_temperature(zv, yv, warn=False)
                vn = float(predictive_nll(zv, yv, temperature=T))
                Tg = llp.fit_temperature(
                    lambda u, zv=zv, yv=yv: float(predictive_nll(zv, yv, temperature=u)),
                    0.01,
                    100.0,
                )
                vg = float(predictive_nll(zv, yv, temperature=Tg))
                if vg < vn - 1e-9:  # LBFGS from T = 1 can stop in a poor local optimum (MC)
                    T, vn = Tg, vg
                preds = {k: prediction(outputs(kind, c, t, k), T) for k in ("test", "ood", "near")}
                row = {"t": t, "T": T, "val_nll": vn, **ps.summarise(preds, yt)}
                rows.append((row, preds))
            best_row, best_preds = min(rows, key=lambda r: r[0]["val_nll"])
            results[kind] = best_row
            items[kind] = ps.per_item(best_preds, yt)
            curves[kind] = [
                {
                    k: r[k]
                    for k in ("t", "T", "val_nll", "accuracy", "nll", "auroc_far", "auroc_near")
                }
                for r, _ in rows
            ]
        # laplace-torch last-layer KFAC probit (the study's baseline), recomputed
        model = ps.checkpoint(sets, seed, CKPT, False)
        start = time.perf_counter()
        pred, info = ps.laplace_last_layer(model, sets, seed, mc=False)
        preds = ps.run_predictor(pred, sets, seed)
        results["laplace-torch last-layer KFAC probit"] = {
            **ps.summarise(preds, yt),
            **info,
            "seconds_total": time.perf_counter() - start,
        }
        items["laplace-torch last-layer KFAC probit"] = ps.per_item(preds, yt)
        seeds.append({"seed": seed, "results": results, "curves": curves, "items": items})
        for k, rows in curves.items():
            for r in rows:
                print(seed, "curve", f"{k:32s}", {m: round(v, 4) for m, v in r.items()})
        for k, r in results.items():
            print(
                seed,
                f"{k:40s}",
                {
                    m: round(r[m], 4)
                    for m in (
                        "t",
                        "T",
                        "val_nll",
                        "accuracy",
                        "nll",
                        "ece",
                        "auroc_far",
                        "auroc_near",
                        "auroc_far_mi",
                    )
                    if m in r
                },
                flush=True,
            )
    report = {"seeds": [{k: v for k, v in s.items() if k != "items"} for s in seeds]}
    names = list(seeds[0]["results"])
    report["mean"] = {
        n: {
            m: float(np.mean([s["results"][n][m] for s in seeds]))
            for m in ("val_nll", "accuracy", "nll", "ece", "auroc_far", "auroc_near")
            if m in seeds[0]["results"][n]
        }
        for n in names
    }
    report["paired_vs_ts"] = {
        n: {
            st: ps.paired_interval(seeds, n, "temperature scaling", st)
            for st in ("nll", "auroc_far", "auroc_near")
        }
        for n in names
        if n != "temperature scaling"
    }
    report["paired_vs_laplace_torch"] = {
        n: {
            st: ps.paired_interval(seeds, n, "laplace-torch last-layer KFAC probit", st)
            for st in ("nll", "auroc_far", "auroc_near")
        }
        for n in ("grad2, GLM probit", "grad2, GLM MC")
    }
    tag = "_".join(map(str, a.seeds))
    (OUT / f"results_seeds{tag}.json").write_text(json.dumps(report, indent=1))
    print(
        json.dumps(
            {
                "mean": report["mean"],
                "paired_vs_ts": report["paired_vs_ts"],
                "paired_vs_laplace_torch": report["paired_vs_laplace_torch"],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
