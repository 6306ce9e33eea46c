"""Side-by-side speed and memory of bnnconvert, the deterministic model and bayesian-torch.

For ResNet18 (14 classes, batch 16x3x64x64) and a UNet (batch 4x1x64x64) it measures, for
the deterministic model, our partial model at r_bayes = 1, 5, 20, 100 % (grad2 saliency),
two "last stage" selections (1 % of the model's entries, all inside the last stage; and
every entry of the last stage) and bayesian-torch's full ``dnn_to_bnn`` conversion:

- memory: parameters + buffers in bytes;
- a training step (forward + backward + KL, one sample);
- 5-sample prediction (eval, no grad), plain loop and hoisted (``mc_outputs``);
- a 5-sample ELBO training step, plain loop and hoisted (``bnnconvert.elbo_loss``);
- the floors of both: the same hoisted 5-sample call with every layer at its mean (no
  noise drawn), i.e. what the split costs if sampling were free;
- KL and one posterior draw of every Bayesian layer (copying, as prediction does it, noise only);
- the saliency pass against a plain forward + backward over the same batches;
- convert() time, and the peak memory of an in-place convert() of a ~100M-parameter model.

Runs are interleaved (every round times each variant once, in a rotating order); the
reported time is the median over rounds and the ratio the median of the per-round ratios to
the deterministic reference of the same round. On CUDA every timing synchronises, and the
peak of torch.cuda.max_memory_allocated is recorded per variant.

    python benchmarks/bench_core.py [--device cpu|cuda] [--quick] [--repeats N]
        [--threads N] [--json PATH] [--markdown PATH]
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bnnconvert
from bnnconvert.layers import bayesian_layers, convertible_parameters, posterior_cache
from bnnconvert.models import UNet, resnet18
from bnnconvert.sampling import hoist_plan, mc_outputs

SAMPLES = 5
BETA = 0.01
RATES = (0.01, 0.05, 0.2, 1.0)
BT_PRIOR = {  # bayesian-torch's const_bnn_prior_parameters, MOPED on so mu = trained weights
    "prior_mu": 0.0,
    "prior_sigma": 1.0,
    "posterior_mu_init": 0.0,
    "posterior_rho_init": -3.0,
    "type": "Reparameterization",
    "moped_enable": True,
    "moped_delta": 0.5,
}


# ------------------------------------------------------------------------ setups
@dataclass
class Setup:
    """One architecture with its benchmark batch."""

    name: str
    model: nn.Module
    x: Tensor
    y: Tensor
    late: tuple[str, ...]  # parameter name prefixes of the last stage

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out, y)


def make_setups(quick: bool, device: torch.device, models: list[str]) -> list[Setup]:
    """ResNet18 (16x3x64x64, 14 classes) and UNet (4x1x64x64); tiny inputs when quick."""
    g = torch.Generator().manual_seed(0)
    setups = []
    if "resnet18" in models:
        n, s = (2, 32) if quick else (16, 64)
        x = torch.randn(n, 3, s, s, generator=g)
        y = torch.randint(0, 14, (n,), generator=g)
        setups.append(Setup("resnet18", resnet18(14), x, y, ("layer4.", "fc.")))
    if "unet" in models:
        n, s, base, depth = (1, 16, 4, 2) if quick else (4, 64, 16, 4)
        x = torch.randn(n, 1, s, s, generator=g)
        y = torch.randint(0, 2, (n, s, s), generator=g)
        late = (f"up.{depth - 1}.", f"decoder.{depth - 1}.", "head.")
        setups.append(Setup("unet", UNet(1, 2, base, depth), x, y, late))
    for st in setups:
        st.model.to(device)
        st.x, st.y = st.x.to(device), st.y.to(device)
    return setups


# ------------------------------------------------------------------------ variants
@dataclass
class Variant:
    """A model to compare: kind "det", "ours" or "bt" (bayesian-torch)."""

    name: str
    model: nn.Module
    kind: str
    k: int = 0
    convert_s: float | None = None


def make_variants(st: Setup, sal: bnnconvert.Saliency, rates: tuple[float, ...]) -> list[Variant]:
    """The deterministic model, ours at each rate and for the last stage, bayesian-torch."""
    out = [Variant("det", st.model, "det")]
    for r in rates:
        t0 = time.perf_counter()
        model = bnnconvert.convert(st.model, sal, r)
        out.append(Variant(f"ours r={r:g}", model, "ours", _k(model), time.perf_counter() - t0))
    late = {n: s for n, s in sal.scores.items() if n.startswith(st.late)}
    k1 = round(0.01 * sal.num_entries)
    sub = bnnconvert.Saliency(late, sal.criterion)
    for label, masks in (
        ("last stage 1 %", sub.select(min(1.0, k1 / sub.num_entries))),
        ("last stage all", {n: torch.ones_like(s, dtype=torch.bool) for n, s in late.items()}),
    ):
        model = bnnconvert.convert(st.model, masks, None)
        out.append(Variant(label, model, "ours", _k(model)))
    out.append(Variant("bayesian-torch", _bayesian_torch(st.model), "bt", _numel(st.model)))
    return out


def _bayesian_torch(model: nn.Module) -> nn.Module:
    from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn

    model = copy.deepcopy(model)
    dnn_to_bnn(model, BT_PRIOR)  # sets dnn_to_bnn_flag: its layers return tensors, not (out, kl)
    return model


def _bt_kl(model: nn.Module) -> Tensor:
    from bayesian_torch.models.dnn_to_bnn import get_kl_loss

    return get_kl_loss(model)


def _k(model: nn.Module) -> int:
    return sum(m.bayes_rho(n).numel() for _, m in bayesian_layers(model) for n in m.bayes_names)


def _numel(model: nn.Module) -> int:
    return sum(p.numel() for p in convertible_parameters(model).values())


def state_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers (persistent or not)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def check_formula(det: nn.Module, v: Variant) -> bool:
    """Parameters of ours = original + k; buffers = original + idx entries + 3 per layer
    (the prior's mean and sigma, the sigma scale t; counts of entries; the bytes are in
    memory_ratio)."""
    layers = [m for _, m in bayesian_layers(v.model)]
    idx = sum(m._buffers[f"{n}_idx"].numel() for m in layers for n in m.bayes_names)
    params_ok = _count(v.model.parameters()) == _count(det.parameters()) + v.k
    buffers_ok = _count(v.model.buffers()) == _count(det.buffers()) + idx + 3 * len(layers)
    return params_ok and buffers_ok


def _count(tensors) -> int:
    return sum(t.numel() for t in tensors)


# ------------------------------------------------------------------------ workloads
def _zero(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def _kl(v: Variant) -> Tensor | float:
    if v.kind == "ours":
        return bnnconvert.kl_loss(v.model)
    return _bt_kl(v.model) if v.kind == "bt" else 0.0


def step_fn(st: Setup, v: Variant) -> Callable[[], None]:
    """One training step: forward + loss (+ beta * KL) + backward, one sample."""

    def run() -> None:
        _zero(v.model)
        (st.loss(v.model(st.x), st.y) + BETA * _kl(v)).backward()

    return run


def elbo_fn(st: Setup, v: Variant, hoist: bool) -> Callable[[], None]:
    """A 5-sample ELBO step: ``bnnconvert.elbo_loss`` (hoisted) for ours with hoist, else
    the plain loop: mean NLL over 5 forwards + beta * KL."""

    def run() -> None:
        _zero(v.model)
        if hoist and v.kind == "ours":
            loss = bnnconvert.elbo_loss(v.model, st.x, st.y, st.loss, beta=BETA, samples=SAMPLES)
            loss.loss.backward()
            return
        nll = sum(st.loss(v.model(st.x), st.y) for _ in range(SAMPLES)) / SAMPLES
        (nll + BETA * _kl(v)).backward()

    return run


def predict_fn(st: Setup, v: Variant, samples: int, hoist: bool) -> Callable[[], None]:
    """``samples`` Monte Carlo forwards without grad (one plain forward for samples=1)."""

    def run() -> None:
        with torch.no_grad():
            if samples == 1:
                v.model(st.x)
            else:
                mc_outputs(v.model, st.x, samples, hoist=hoist and v.kind == "ours")

    return run


def floor_fn(st: Setup, v: Variant, train: bool) -> Callable[[], None]:
    """The hoisted 5-sample ELBO step (train) or prediction (eval) of ``v`` with every
    Bayesian layer at its mean: the same prefix/suffix split and the same S suffix runs,
    no noise. Its ratio is the floor that cheaper sampling could reach. Build it after
    setting the train/eval mode (the split depends on it)."""
    plan = hoist_plan(v.model)

    def outputs():
        if plan is None:
            return (v.model(st.x) for _ in range(SAMPLES))
        return plan.iterate(st.x, SAMPLES)

    def run() -> None:
        with bnnconvert.mean_weights(v.model):
            if not train:
                with torch.no_grad():
                    list(outputs())
                return
            _zero(v.model)
            nll = sum(st.loss(out, st.y) for out in outputs()) / SAMPLES
            (nll + BETA * _kl(v)).backward()

    return run


def kl_fn(v: Variant) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            _kl(v)

    return run


def sample_fn(v: Variant, how: str) -> Callable[[], None]:
    """One posterior draw of every Bayesian tensor without grad: "draw" the copying draw
    of training (noise + copy of mu), "predict" what a prediction forward does (in place
    where the layer perturbs in place, and the write-back), "noise" only softplus(rho) * eps,
    "predict5" five "predict" draws in one ``posterior_cache`` block (as ``mc_outputs``
    draws them: softplus and the gather of mu once)."""
    layers = [m for _, m in bayesian_layers(v.model)]

    def run() -> None:
        if how == "predict5":
            with torch.no_grad(), posterior_cache(v.model):
                for _ in range(SAMPLES):
                    for m in layers:
                        for n in m.bayes_names:
                            if m.perturbs_in_place(n):
                                m._unperturb(m._perturb(n))
                            else:
                                m.sample_parameter(n)
            return
        with torch.no_grad():
            for m in layers:
                for n in m.bayes_names:
                    if how == "noise":
                        m.sample_noise(n)
                    elif how == "predict" and m.perturbs_in_place(n):
                        m._unperturb(m._perturb(n))
                    else:
                        m.sample_parameter(n)

    return run


# ------------------------------------------------------------------------ timing
CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def measure(calls: dict[str, Callable[[], None]], repeats: int, sync: Callable[[], None]):
    """Interleaved timings {name: [seconds per round]}: each round runs every call once, in
    an order rotated by one per round; one untimed warm-up call each first. The clock is
    wall time, or with ``--clock cpu`` the process's CPU time (steadier on a shared machine;
    meaningful with ``--threads 1``)."""
    for fn in calls.values():
        fn()
    sync()
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            t0 = _clock()
            calls[name]()
            sync()
            times[name].append(_clock() - t0)
    return times


def paired_ratio(times: list[float], ref: list[float]) -> float:
    """Median over rounds of time / reference time of the same round."""
    return statistics.median(t / r for t, r in zip(times, ref))


def cuda_peak(fn: Callable[[], None], device: torch.device) -> int | None:
    """torch.cuda.max_memory_allocated during one call (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


# ------------------------------------------------------------------------ per model
@dataclass
class ModelResult:
    name: str
    input_shape: list[int]
    rows: dict[str, dict] = field(default_factory=dict)  # variant -> metric -> value
    extra: dict = field(default_factory=dict)


def bench_model(st: Setup, args, device: torch.device, sync) -> ModelResult:
    """Every metric for every variant of one architecture."""
    res = ModelResult(st.name, list(st.x.shape))
    batches = [(st.x, st.y)] * (2 if args.quick else 4)
    sal = bnnconvert.compute_saliency(st.model, batches, st.loss)
    variants = make_variants(st, sal, args.rates)
    det = variants[0]
    for v in variants:
        res.rows[v.name] = {
            "kind": v.kind,
            "k": v.k,
            "params": _count(v.model.parameters()),
            "bytes": state_bytes(v.model),
            "memory_ratio": state_bytes(v.model) / state_bytes(det.model),
            "formula_ok": check_formula(det.model, v) if v.kind == "ours" else None,
            "convert_s": v.convert_s,
        }
    _train_metrics(st, variants, res, args.repeats, device, sync)
    _predict_metrics(st, variants, res, args.repeats, device, sync)
    _cost_metrics(variants, res, args.repeats, sync)
    res.extra["saliency"] = _saliency_metric(st, batches, args.repeats, sync)
    res.extra["convert_s"] = _convert_metric(st, sal, args.repeats)
    return res


def _record(res, variants, metric, times, ref, peaks=None) -> None:
    for v in variants:
        if v.name not in times:
            continue
        row = res.rows[v.name]
        row[f"{metric}_s"] = statistics.median(times[v.name])
        row[f"{metric}_ratio"] = paired_ratio(times[v.name], ref)
        if peaks is not None and peaks.get(v.name) is not None:
            row[f"{metric}_cuda_peak_bytes"] = peaks[v.name]


def _train_metrics(st, variants, res, repeats, device, sync) -> None:
    for v in variants:
        v.model.train()
    steps = {v.name: step_fn(st, v) for v in variants}
    times = measure(steps, repeats, sync)
    ref = times["det"]
    _record(res, variants, "step1", times, ref, _peaks(steps, device))
    for hoist in (False, True):
        calls = {"det": steps["det"]}
        calls.update({v.name: elbo_fn(st, v, hoist) for v in variants[1:]})
        if hoist:
            calls = {n: f for n, f in calls.items() if res.rows[n]["kind"] != "bt"}
        times = measure(calls, repeats, sync)
        metric = "elbo5_hoisted" if hoist else "elbo5_plain"
        _record(res, variants[1:], metric, times, times["det"], _peaks(calls, device))
    _floor_metric(st, variants, res, repeats, sync, steps["det"], train=True)


def _floor_metric(st, variants, res, repeats, sync, det_call, train: bool) -> None:
    calls = {"det": det_call}
    calls.update({v.name: floor_fn(st, v, train) for v in variants if v.kind == "ours"})
    times = measure(calls, repeats, sync)
    _record(res, variants[1:], "elbo5_floor" if train else "pred5_floor", times, times["det"])


def _predict_metrics(st, variants, res, repeats, device, sync) -> None:
    for v in variants:
        v.model.eval()
    for hoist in (False, True):
        calls = {"det": predict_fn(st, variants[0], 1, False)}
        calls.update(
            {
                v.name: predict_fn(st, v, SAMPLES, hoist)
                for v in variants[1:]
                if not (hoist and v.kind == "bt")
            }
        )
        times = measure(calls, repeats, sync)
        metric = "pred5_hoisted" if hoist else "pred5_plain"
        _record(res, variants[1:], metric, times, times["det"], _peaks(calls, device))
        res.rows["det"].setdefault("pred1_s", statistics.median(times["det"]))
    det_forward = predict_fn(st, variants[0], 1, False)
    _floor_metric(st, variants, res, repeats, sync, det_forward, train=False)


def _cost_metrics(variants, res, repeats, sync) -> None:
    """KL and one draw of all Bayesian tensors (absolute times; O(k) vs O(N))."""
    ours = [v for v in variants if v.kind == "ours"]
    calls = {}
    for v in ours:
        calls[f"{v.name}|kl"] = kl_fn(v)
        for how in ("draw", "predict", "noise", "predict5"):
            calls[f"{v.name}|{how}"] = sample_fn(v, how)
    times = measure(calls, repeats, sync)
    for key, ts in times.items():
        name, what = key.split("|")
        per_draw = SAMPLES if what == "predict5" else 1
        res.rows[name][f"{what}_ms"] = 1000 * statistics.median(ts) / per_draw


def _peaks(calls, device) -> dict[str, int | None]:
    return {n: cuda_peak(f, device) for n, f in calls.items()}


def _saliency_metric(st: Setup, batches, repeats: int, sync) -> dict:
    """compute_saliency against plain forward + backward passes over the same batches:
    gradients accumulated over the batches (the same work, zeroed once) and, for
    reference, zeroed before every batch."""
    model = st.model

    def plain(accumulate: bool) -> Callable[[], None]:
        def run() -> None:
            model.train()
            _zero(model)
            for x, y in batches:
                if not accumulate:
                    _zero(model)
                st.loss(model(x), y).backward()
            model.eval()

        return run

    def saliency() -> None:
        bnnconvert.compute_saliency(model, batches, st.loss)

    calls = {"accumulate": plain(True), "zeroed": plain(False), "saliency": saliency}
    times = measure(calls, repeats, sync)
    return {
        "batches": len(batches),
        "plain_s": statistics.median(times["accumulate"]),
        "saliency_s": statistics.median(times["saliency"]),
        "ratio": paired_ratio(times["saliency"], times["accumulate"]),
        "ratio_to_zeroed": paired_ratio(times["saliency"], times["zeroed"]),
    }


def _convert_metric(st: Setup, sal, repeats: int) -> dict:
    """Median seconds of convert(model, saliency, 0.01): a copy, and in place (on the
    ``--clock`` clock)."""
    copies, inplace = [], []
    for _ in range(max(3, repeats // 2)):
        t0 = _clock()
        bnnconvert.convert(st.model, sal, 0.01)
        copies.append(_clock() - t0)
        fresh = copy.deepcopy(st.model)
        t0 = _clock()
        bnnconvert.convert(fresh, sal, 0.01, inplace=True)
        inplace.append(_clock() - t0)
    return {"copy_s": statistics.median(copies), "inplace_s": statistics.median(inplace)}


# ------------------------------------------------------------------------ 100M convert
def convert_memory(width: int, depth: int, inplace: bool) -> dict:
    """Peak resident memory added by convert() of a Linear stack (runs in a subprocess).

    The peak is Linux's VmHWM, reset through /proc/self/clear_refs just before convert;
    torch's CPU allocations are plain malloc, so RSS sees them (tracemalloc does not).
    """
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(depth)))
    masks = {n: torch.rand(p.shape) < 0.01 for n, p in convertible_parameters(model).items()}
    weights = state_bytes(model)
    before = reset_peak()
    t0 = time.perf_counter()
    bnnconvert.convert(model, masks, None, inplace=inplace)
    seconds = time.perf_counter() - t0
    extra = status_kib("VmHWM") * 1024 - before
    return {
        "params": _count(model.parameters()),
        "weight_bytes": weights,
        "inplace": inplace,
        "convert_s": seconds,
        "extra_peak_bytes": extra,
        "extra_peak_fraction": extra / weights,
    }


def reset_peak() -> int:
    """Reset the high-water mark of resident memory; return the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kib("VmRSS") * 1024


def status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def run_convert_memory(quick: bool) -> list[dict]:
    """convert_memory in fresh processes, in place and (for contrast) on a copy."""
    width, depth = (512, 2) if quick else (4096, 6)
    out = []
    for inplace in (True,) if quick else (True, False):
        cmd = [sys.executable, __file__, "--convert-memory", f"{width},{depth},{int(inplace)}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"convert-memory run failed:\n{proc.stderr}", file=sys.stderr)
            continue
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


# ------------------------------------------------------------------------ report
TARGETS = (  # (label, variant, metric, limit) on ResNet18; "*" = every "ours" variant
    ("memory, r = 1 %", "ours r=0.01", "memory_ratio", 1.03),
    ("training step, r = 1 %", "ours r=0.01", "step1_ratio", 1.15),
    ("5-sample prediction (hoisted), any selection", "*", "pred5_hoisted_ratio", 5.3),
    ("5-sample prediction (plain loop), any selection", "*", "pred5_plain_ratio", 5.3),
    ("5-sample prediction, last stage 1 %, hoisted", "last stage 1 %", "pred5_hoisted_ratio", 2.5),
    ("5-sample prediction, last stage all, hoisted", "last stage all", "pred5_hoisted_ratio", 2.5),
    ("5-sample ELBO step, last stage 1 %, hoisted", "last stage 1 %", "elbo5_hoisted_ratio", 2.5),
    ("5-sample ELBO step, last stage all, hoisted", "last stage all", "elbo5_hoisted_ratio", 2.5),
)


def targets(results: list[ModelResult], mem: list[dict]) -> list[dict]:
    """Pass/miss of every issue target (ResNet18 rows, plus the UNet where they apply)."""
    out = []
    for res in results:
        for label, variant, metric, limit in TARGETS:
            names = (
                [n for n, r in res.rows.items() if r["kind"] == "ours"]
                if variant == "*"
                else [variant]
            )
            for name in names:
                value = res.rows.get(name, {}).get(metric)
                if value is not None:
                    out.append(_target(res.name, f"{label} [{name}]", value, limit))
        sal = res.extra["saliency"]["ratio"]
        out.append(_target(res.name, "saliency pass / forward+backward", sal, 1.1))
        out.append(
            _target(res.name, "convert() seconds (copy)", res.extra["convert_s"]["copy_s"], 0.5)
        )
    for m in mem:
        label = f"convert() {'in place' if m['inplace'] else 'copy'}: extra peak / weights"
        out.append(
            _target(
                f"linear {m['params'] / 1e6:.0f}M",
                label,
                m["extra_peak_fraction"],
                0.5 if m["inplace"] else None,
            )
        )
    return out


def _target(model: str, label: str, value: float, limit: float | None) -> dict:
    ok = None if limit is None else bool(value <= limit)
    return {"model": model, "target": label, "value": value, "limit": limit, "pass": ok}


def markdown(meta: dict, results: list[ModelResult], tgt: list[dict], mem: list[dict]) -> str:
    """The results as markdown tables."""
    lines = [
        "## Setup",
        "",
        *(f"- {k}: {v}" for k, v in meta.items()),
        "",
        "Ratios are medians of per-round ratios to the deterministic model in the same round:",
        "memory and training steps to the deterministic model's, predictions to ONE",
        "deterministic forward. KL / draw / pred draw / noise are absolute milliseconds of",
        "one draw of every Bayesian tensor (draw = noise + the copy of mu made by index_add,",
        "as in training; pred draw = what a prediction forward does, in place for tensors",
        "with k <= N/16; cached = the same, averaged over 5 draws sharing softplus(rho) and",
        "the gather of mu as in mc_outputs; noise = softplus(rho) * eps only). Floor = the",
        "hoisted 5-sample call with every layer at its mean: the cost of the split itself.",
        "",
    ]
    cols = [
        ("k", "k", "{:,}"),
        ("params", "params", "{:,}"),
        ("memory_ratio", "memory x", "{:.4f}"),
        ("step1_ratio", "train step x", "{:.2f}"),
        ("pred5_plain_ratio", "pred 5 plain x", "{:.2f}"),
        ("pred5_hoisted_ratio", "pred 5 hoisted x", "{:.2f}"),
        ("pred5_floor_ratio", "pred 5 floor x", "{:.2f}"),
        ("elbo5_plain_ratio", "ELBO 5 plain x", "{:.2f}"),
        ("elbo5_hoisted_ratio", "ELBO 5 hoisted x", "{:.2f}"),
        ("elbo5_floor_ratio", "ELBO 5 floor x", "{:.2f}"),
        ("kl_ms", "KL ms", "{:.2f}"),
        ("draw_ms", "draw ms", "{:.1f}"),
        ("predict_ms", "pred draw ms", "{:.1f}"),
        ("predict5_ms", "cached ms", "{:.1f}"),
        ("noise_ms", "noise ms", "{:.1f}"),
    ]
    for res in results:
        det, sal = res.rows["det"], res.extra["saliency"]
        lines += [
            f"## {res.name}, input {tuple(res.input_shape)}",
            "",
            f"Deterministic: forward {1000 * det['pred1_s']:.1f} ms, training step "
            f"{1000 * det['step1_s']:.1f} ms. Saliency pass {sal['ratio']:.2f}x a forward + "
            f"backward over the same {sal['batches']} batches accumulating gradients "
            f"({sal['ratio_to_zeroed']:.2f}x when zeroing them every batch); convert() "
            f"{res.extra['convert_s']['copy_s']:.3f} s (copy), "
            f"{res.extra['convert_s']['inplace_s']:.3f} s (in place).",
            "",
            "| variant | " + " | ".join(c[1] for c in cols) + " |",
            "|---|" + "---:|" * len(cols),
        ]
        for name, row in res.rows.items():
            cells = [c[2].format(row[c[0]]) if row.get(c[0]) is not None else "" for c in cols]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if mem:
        lines += [
            "## convert() peak memory",
            "",
            "| params | inplace | seconds | extra peak MiB | extra / weights |",
            "|---:|---|---:|---:|---:|",
        ]
        for m in mem:
            lines.append(
                f"| {m['params']:,} | {m['inplace']} | {m['convert_s']:.2f} | "
                f"{m['extra_peak_bytes'] / 2**20:.1f} | {m['extra_peak_fraction']:.3f} |"
            )
        lines.append("")
    lines += ["## Targets", "", "| model | target | value | limit | result |"]
    lines.append("|---|---|---:|---:|---|")
    for t in tgt:
        verdict = {True: "pass", False: "MISS", None: "info"}[t["pass"]]
        limit = "" if t["limit"] is None else f"{t['limit']:g}"
        lines.append(f"| {t['model']} | {t['target']} | {t['value']:.4f} | {limit} | {verdict} |")
    return "\n".join(lines) + "\n"


def machine(device: torch.device) -> dict:
    """CPU model, cores, torch version, threads and GPU (if any)."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "clock": _clock.__name__,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny inputs, 2 repeats")
    p.add_argument("--repeats", type=int, default=None, help="rounds per metric (default 7)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--clock", choices=sorted(CLOCK), default="wall", help="wall or cpu time")
    p.add_argument("--models", default="resnet18,unet", help="comma-separated: resnet18,unet")
    p.add_argument("--rates", default=",".join(map(str, RATES)), help="r_bayes values")
    p.add_argument("--no-convert-memory", action="store_true", help="skip the 100M convert")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--markdown", type=Path, help="write the markdown tables here")
    p.add_argument("--convert-memory", help=argparse.SUPPRESS)  # internal: subprocess mode
    args = p.parse_args(argv)
    args.rates = tuple(float(r) for r in args.rates.split(","))
    args.repeats = args.repeats or (2 if args.quick else 7)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.convert_memory:
        width, depth, inplace = map(int, args.convert_memory.split(","))
        print(json.dumps(convert_memory(width, depth, bool(inplace))))
        return {}
    global _clock
    _clock = CLOCK[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    meta = machine(device)
    meta["command"] = "python benchmarks/bench_core.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    results = []
    for st in make_setups(args.quick, device, args.models.split(",")):
        print(f"benchmarking {st.name} {tuple(st.x.shape)} ...", file=sys.stderr)
        results.append(bench_model(st, args, device, sync))
    mem = [] if args.no_convert_memory else run_convert_memory(args.quick)
    tgt = targets(results, mem)
    report = {
        "meta": meta,
        "models": {
            r.name: {"input": r.input_shape, "variants": r.rows, **r.extra} for r in results
        },
        "convert_memory": mem,
        "targets": tgt,
    }
    text = markdown(meta, results, tgt, mem)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.markdown:
        args.markdown.write_text(text)
    return report


if __name__ == "__main__":
    main()
