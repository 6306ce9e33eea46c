"""Stage 1: per seed, fit the Laplace posteriors (grad2 1 %, last layer), then cache
f(x; mu) and S linearised logit perturbations J(x) delta_s (delta_s = sigma * eps_s at t=1)
for val/test/ood/near, the exact last-layer logit variance, and a nonlinearity check."""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # posterior_study, beside this folder
import posterior_study as ps
import torch
from torch.func import functional_call, jvp

import bnnconvert
from bnnconvert.layers import bayesian_layers, sigma_scale

OUT = Path(__file__).resolve().parent
CKPT = Path(__file__).resolve().parents[1] / "posterior_study"
NAMES = ("val", "test", "ood", "near")


def sigmas(model, sets, seed, selection, saliency):
    masks = saliency if selection == "grad2" else ps.masks_last_layer(model)
    r = 0.01 if selection == "grad2" else None
    pbnn = bnnconvert.convert(copy.deepcopy(model), masks, r, moped_delta=0.1)
    start = time.perf_counter()
    rep = bnnconvert.fit_posterior(
        pbnn,
        ps.train_loader(sets, seed, shuffle=False),
        method="laplace",
        seed=seed,
        progress=False,
    )
    fit_s = time.perf_counter() - start
    assert abs(sigma_scale(pbnn) - 1.0) < 1e-12, sigma_scale(pbnn)
    out = {}
    ref = dict(model.named_parameters())
    for mod, layer in bayesian_layers(pbnn):
        for n in layer.bayes_names:
            key = f"{mod}.{n}" if mod else n
            mu = layer._parameters[n].detach()
            assert torch.equal(mu, ref[key].detach()), key  # mu = pretrained weight
            out[key] = layer.posterior_sigma(n).detach().clone()
    allsig = torch.cat([s[s > 0] for s in out.values()])
    info = {
        "fit_seconds": fit_s,
        "prior_precision": float(rep.prior_precision),
        "entries": int(allsig.numel()),
        "sigma_quantiles": {q: float(allsig.quantile(q)) for q in (0.1, 0.5, 0.9)},
        "per_tensor": {
            k: [
                int((s > 0).sum()),
                float(s[s > 0].median()) if (s > 0).any() else 0.0,
                float(ref[k].detach()[s > 0].abs().median()) if (s > 0).any() else 0.0,
            ]
            for k, s in out.items()
        },
    }
    return out, info


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--ll-samples", type=int, default=30)
    a = p.parse_args()
    torch.set_num_threads(1)
    seed, S = a.seed, a.samples
    t_all = time.perf_counter()
    sets = ps.load_sets(False)
    model = ps.checkpoint(sets, seed, CKPT, False).eval()
    x = torch.cat([sets[k][0] if isinstance(sets[k], tuple) else sets[k] for k in NAMES])
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    res = {"seed": seed, "samples": S, "ll_samples": a.ll_samples}
    start = time.perf_counter()
    with torch.no_grad():
        f = torch.cat([model(b) for b in x.split(500)])
    res["forward_seconds_2000"] = time.perf_counter() - start
    start = time.perf_counter()
    saliency = bnnconvert.compute_saliency(model, ps.train_loader(sets, seed, shuffle=False))
    res["saliency_seconds"] = time.perf_counter() - start
    cache = {"f": f, "y_val": sets["val"][1], "y_test": sets["test"][1]}
    for selection in ("last layer", "grad2"):
        sig, info = sigmas(model, sets, seed, selection, saliency)
        keys = list(sig)
        S = a.samples if selection == "grad2" else a.ll_samples
        gen = torch.Generator().manual_seed(10_000 + seed)
        jd = torch.empty(S, len(x), f.shape[1])

        def fn(sub, xb):
            return functional_call(model, ({**params, **sub}, buffers), (xb,))

        start = time.perf_counter()
        with torch.no_grad():
            for s in range(S):
                tang = {k: sig[k] * torch.randn(sig[k].shape, generator=gen) for k in keys}
                prim = {k: params[k] for k in keys}
                outs = [jvp(lambda q, xb=xb: fn(q, xb), (prim,), (tang,))[1] for xb in x.split(500)]
                jd[s] = torch.cat(outs)
                if s == 0:
                    # nonlinearity check on val (first 500 items): f(mu + t d) - f(mu) vs t J d
                    chk = {}
                    xv = x[:500]
                    for t in (1 / 16, 1 / 4, 1.0):
                        fn_ = fn({k: params[k] + t * tang[k] for k in keys}, xv)
                        lin = f[:500] + t * jd[0, :500]
                        chk[str(t)] = {
                            "rel_err": float((fn_ - lin).norm() / (t * jd[0, :500]).norm()),
                            "acc_nonlinear": float(
                                (fn_.argmax(1) == sets["val"][1]).double().mean()
                            ),
                            "acc_linear": float((lin.argmax(1) == sets["val"][1]).double().mean()),
                        }
                    info["nonlinearity_check_val_draw0"] = chk
        info["jvp_seconds_total"] = time.perf_counter() - start
        info["jvp_seconds_per_draw_2000_items"] = info["jvp_seconds_total"] / S
        var_mc = (jd**2).mean(0)
        info["logit_std_t1_median"] = float(var_mc.sqrt().median())
        info["logit_abs_median"] = float(f.abs().median())
        if selection == "last layer":
            head, model.fc = model.fc, torch.nn.Identity()
            with torch.no_grad():
                feats = torch.cat([model(b) for b in x.split(500)]).double()
            model.fc = head
            exact = feats**2 @ (sig["fc.weight"].double() ** 2).T + sig["fc.bias"].double() ** 2
            cache["var_exact_last"] = exact.float()
            info["var_mc_vs_exact_rel_median"] = float(
                ((var_mc.double() - exact).abs() / exact).median()
            )
            info["var_mc_over_exact_mean"] = float((var_mc.double() / exact).mean())
        cache[f"jd_{selection}"] = jd
        res[selection] = info
        print(
            selection, json.dumps({k: v for k, v in info.items() if k != "per_tensor"}), flush=True
        )
    res["total_seconds"] = time.perf_counter() - t_all
    torch.save(cache, OUT / f"cache_seed{seed}.pt")
    (OUT / f"stage1_seed{seed}.json").write_text(json.dumps(res, indent=1))
    print("done", res["total_seconds"])


if __name__ == "__main__":
    main()
