"""Last-layer covariance structures (diag / KFAC / full) with our (t, T) calibration.

Exploration only. Usage: OMP_NUM_THREADS=1 python cov_study.py SEED
Writes seed{SEED}.json beside this script (rows + per-item data for paired intervals).
"""

import json
import math
import sys
import time
from functools import partial
from pathlib import Path

import torch
from scipy.optimize import minimize_scalar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the study's modules
import last_layer_predictives as llp
import posterior_study as ps

import bnnconvert

torch.set_num_threads(1)
OUT = Path(__file__).resolve().parent
FOLDER = Path(__file__).resolve().parents[1] / "posterior_study"
T0 = time.perf_counter()


def log(msg):
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def marglik_lambda(eigs: torch.Tensor, sqnorm: float) -> tuple[float, float]:
    """argmax over lambda of 0.5 P log(lam) - 0.5 sum log(e + lam) - 0.5 lam ||theta||^2
    (the lambda-dependent part of the Laplace log evidence), eigs: the GGN's eigenvalues."""
    e = eigs.clamp_min(0).double()
    P = len(e)

    def neg(loglam):
        lam = math.exp(loglam)
        return -(0.5 * P * loglam - 0.5 * torch.log(e + lam).sum().item() - 0.5 * lam * sqnorm)

    r = minimize_scalar(
        neg, bounds=(math.log(1e-6), math.log(1e6)), method="bounded", options={"xatol": 1e-8}
    )
    return math.exp(r.x), -r.fun


def main(seed: int):
    sets = ps.load_sets(False)
    model = ps.checkpoint(sets, seed, FOLDER, False)
    W = model.fc.weight.detach().double()  # (10, 512)
    b = model.fc.bias.detach().double()  # (10,)
    C, D = W.shape
    sqnorm = float((W**2).sum() + (b**2).sum())

    # ---------------------------------------------------------- features
    xs = torch.cat([x for x, _ in ps.train_loader(sets, seed, shuffle=False)])
    log(f"train items {len(xs)}")
    inputs = {k: sets[k][0] if isinstance(sets[k], tuple) else sets[k] for k in llp.SETS[:4]}
    inputs["syn"] = bnnconvert.synthetic_outliers(sets["val"][0], seed=seed)
    inputs["train"] = xs
    feats = {k: llp.features(model, x) for k, x in inputs.items()}
    log("features done")
    phi = feats["train"]
    N = len(phi)
    phit = torch.cat([phi, torch.ones(N, 1, dtype=phi.dtype)], 1)  # (N, 513)
    p = (phi @ W.T + b).softmax(1)  # (N, 10)
    Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (N, 10, 10)

    covs = {}  # name -> function(features (M, 512)) -> var (M, 10)
    lambdas = {}

    # ---------------------------------------------------------- diag (exact GGN diagonal)
    hdiag = (p * (1 - p)).T @ (phit**2)  # (10, 513): class k, input i
    lam, ev = marglik_lambda(hdiag.flatten(), sqnorm)
    lambdas["diag"] = {"lambda": lam, "log_evidence_part": ev}
    sd = 1.0 / (hdiag + lam)
    covs["diag"] = lambda f, sd=sd: (
        torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], 1) ** 2 @ sd.T
    )
    log(f"diag lambda {lam:.4g}")

    # ---------------------------------------------------------- KFAC, laplace-torch layout
    # weight block kron(B, A) with A = sum phi phi^T / N, B = sum Lambda_n; bias block B
    A = phi.T @ phi / N
    B = Lam.sum(0)
    a, UA = torch.linalg.eigh(A)
    bb, UB = torch.linalg.eigh(B)
    a, bb = a.clamp_min(0), bb.clamp_min(0)
    eig_w = (bb[:, None] * a[None, :]).flatten()
    lam, ev = marglik_lambda(torch.cat([eig_w, bb]), sqnorm)
    lambdas["kfac (laplace-torch layout)"] = {"lambda": lam, "log_evidence_part": ev}

    def kfac_lt(f, lam=lam, a=a, UA=UA, bb=bb, UB=UB):
        psi2 = (f @ UA) ** 2  # (M, 512)
        c = psi2 @ (1.0 / (bb[:, None] * a[None, :] + lam)).T  # (M, 10) per eigvec of B
        var_w = c @ (UB**2).T  # (M, 10)
        var_b = (UB**2) @ (1.0 / (bb + lam))  # (10,)
        return var_w + var_b[None]

    covs["kfac (laplace-torch layout)"] = kfac_lt
    log(f"kfac-lt lambda {lam:.4g}")

    # ---------------------------------------------------------- KFAC on [phi, 1] (brief's)
    A2 = phit.T @ phit
    B2 = Lam.sum(0) / N
    a2, UA2 = torch.linalg.eigh(A2)
    b2, UB2 = torch.linalg.eigh(B2)
    a2, b2 = a2.clamp_min(0), b2.clamp_min(0)
    lam, ev = marglik_lambda((b2[:, None] * a2[None, :]).flatten(), sqnorm)
    lambdas["kfac (augmented)"] = {"lambda": lam, "log_evidence_part": ev}

    def kfac_aug(f, lam=lam, a=a2, UA=UA2, bb=b2, UB=UB2):
        ft = torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], 1)
        c = ((ft @ UA) ** 2) @ (1.0 / (bb[:, None] * a[None, :] + lam)).T
        return c @ (UB**2).T

    covs["kfac (augmented)"] = kfac_aug
    log(f"kfac-aug lambda {lam:.4g}")

    # ---------------------------------------------------------- full GGN
    # order (k, i): index k*513 + i. H[(k,i),(l,j)] = sum_n Lam_n[k,l] phit_ni phit_nj
    Dp = D + 1
    H = torch.zeros(C, Dp, C, Dp, dtype=torch.float64)
    for k in range(C):
        for m in range(k, C):
            blk = (phit * Lam[:, k, m, None]).T @ phit
            H[k, :, m, :] = blk
            if m != k:
                H[m, :, k, :] = blk.T
    H = H.reshape(C * Dp, C * Dp)
    H = (H + H.T) / 2
    log("full H built; eigh ...")
    e, V = torch.linalg.eigh(H)
    log(f"eigh done; min eig {e.min():.3g} max {e.max():.3g}")
    lam, ev = marglik_lambda(e, sqnorm)
    lambdas["full"] = {"lambda": lam, "log_evidence_part": ev}
    Sigma = (V / (e.clamp_min(0) + lam)) @ V.T
    del V, H
    Sig_blocks = torch.stack(
        [Sigma[k * Dp : (k + 1) * Dp, k * Dp : (k + 1) * Dp] for k in range(C)]
    )
    del Sigma

    def full(f, S=Sig_blocks):
        ft = torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], 1)
        return torch.einsum("mi,kij,mj->mk", ft, S, ft)

    covs["full"] = full
    log(f"full lambda {lam:.4g}")
    # sanity: full with GGN diag only == diag
    # ---------------------------------------------------------- curves
    yv, yt = sets["val"][1], sets["test"][1]
    results, items, curves_out = {}, {}, {}
    for name, cov in covs.items():
        logits = {}
        for k in llp.SETS:
            f = feats[k]
            logits[k] = (f @ W.T + b, cov(f).clamp_min(0).sqrt(), None)
        rows = []
        grid = list(llp.SCALES)
        for t in grid:
            T = llp.fit_temperature(partial(llp.val_nll, "probit", logits["val"], yv, t), 0.01)
            rows.append(row(logits, yv, yt, t, T))
        fixed = row(logits, yv, yt, 1.0, 1.0)  # laplace-torch's own use: t = 1, no T
        # diagnostic beyond the grid: t = 16, 32 and the limit t -> inf, where the probit
        # becomes softmax(mean / std / T') (passed as mean/std with std 0 at t = 0)
        ext = []
        for t in (16.0, 32.0):
            T = llp.fit_temperature(partial(llp.val_nll, "probit", logits["val"], yv, t), 1e-4)
            ext.append(row(logits, yv, yt, t, T))
        zl = {k: (m / s, torch.zeros_like(s), None) for k, (m, s, _) in logits.items()}
        T = llp.fit_temperature(partial(llp.val_nll, "probit", zl["val"], yv, 0.0), 0.01)
        r = row(zl, yv, yt, 0.0, T)
        r["t"] = float("inf")
        ext.append(r)
        chosen = {
            "t by validation NLL": llp.choose(rows, "validation NLL"),
            "t by outliers": llp.choose(rows, "outliers"),
            "t = 1, T = 1 (uncalibrated)": fixed,
            "t by validation NLL, grid + 16, 32, inf": llp.choose(rows + ext, "validation NLL"),
        }
        for rule, r in chosen.items():
            key = f"{name}, {rule}"
            results[key] = {m: v for m, v in r.items() if m != "items"}
            items[key] = r["items"]
        if name == "diag":
            results["temperature scaling (probit t=0)"] = {
                m: v for m, v in rows[0].items() if m != "items"
            }
            items["temperature scaling (probit t=0)"] = rows[0]["items"]
        curves_out[name] = [{m: v for m, v in r.items() if m != "items"} for r in rows + ext]
        log(
            f"{name}: "
            + "; ".join(
                f"{rule}: t={r['t']:.3g} T={r['T']:.3f} vNLL={r['val_nll']:.4f} "
                f"NLL={r['nll']:.4f} far={r['auroc_far']:.4f} near={r['auroc_near']:.4f}"
                for rule, r in chosen.items()
            )
        )

    # ---------------------------------------------------------- peers
    y = sets["test"][1]
    for pname, (pred, info) in {
        "temperature scaling": ps.temperature_scaled(model, sets),
        "last-layer Laplace (laplace-torch)": ps.laplace_last_layer(model, sets, seed, mc=False),
    }.items():
        preds = ps.run_predictor(pred, sets, seed)
        s = ps.summarise(preds, y)
        results[pname] = {
            **{k: s[k] for k in ("accuracy", "nll", "auroc_far", "auroc_near")},
            **info,
        }
        it = ps.per_item(preds, y)
        items[pname] = {k: it[k] for k in ("nll", "entropy_test", "entropy_ood", "entropy_near")}
        log(f"{pname}: {results[pname]}")

    out = {
        "seed": seed,
        "lambdas": lambdas,
        "results": results,
        "curves": curves_out,
        "items": items,
        "seconds": time.perf_counter() - T0,
    }
    (OUT / f"seed{seed}.json").write_text(json.dumps(out))
    log("written")


def row(logits, yv, yt, t, T):
    lp = {k: llp.log_predictive("probit", *logits[k], t, T) for k in llp.SETS}
    ent = {k: llp.entropy(v) for k, v in lp.items()}
    nll_items = -lp["test"].gather(1, yt[:, None]).squeeze(1)
    return {
        "t": t,
        "T": T,
        "val_nll": llp.val_nll("probit", logits["val"], yv, t, T),
        "val_outlier_auroc": ps._np_auroc(ent["val"], ent["syn"]),
        "accuracy": float((lp["test"].argmax(1) == yt).double().mean()),
        "nll": float(nll_items.mean()),
        "auroc_far": ps._np_auroc(ent["test"], ent["ood"]),
        "auroc_near": ps._np_auroc(ent["test"], ent["near"]),
        "items": {
            "nll": nll_items.tolist(),
            "entropy_test": ent["test"].tolist(),
            "entropy_ood": ent["ood"].tolist(),
            "entropy_near": ent["near"].tolist(),
        },
    }


if __name__ == "__main__":
    main(int(sys.argv[1]))
