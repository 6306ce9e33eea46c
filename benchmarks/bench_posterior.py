"""Side-by-side cost of fitting and calibrating the posterior, and of the curvature engines.

On ResNet18 (``bnnconvert.models.resnet18(10, 1)``) and the bundled digits
(``bnnconvert.data.demo_classification``: 4,000 training images in batches of 50, the 500
validation images), first trained for one epoch (the model whose posterior is fitted), then
converted at r_bayes = 1 % (grad2 saliency):

1. Laplace fit: ``fit_posterior(pbnn, train, method="laplace")`` (no validation data) and
   the full-network curvature (``curvature.diagonal_ggn(model, train)``, every entry) as
   multiples of ONE training epoch of the same deterministic model on the same data
   (``training.train(model, train, 1)``, default TrainSettings: NLL). Target: at most 2.
2. Calibration: ``calibrate_posterior(pbnn, val, samples=S)`` per tried scale t (the
   number of t from the returned ``Calibration.curve``) as a multiple of one validation
   pass of S posterior samples (``predict(pbnn, val, S)``). Target: at most 1.
3. Curvature engines, on a batch of 64 digits, every Linear/convolution entry, the Monte
   Carlo Fisher (one label drawn per example from the model's predictive): (a)
   ``curvature.diagonal_ggn``, (b) torch.func per-example gradients (``vmap(grad)`` of
   ``functional_call``, unchunked, squared and summed), (c) BackPACK's ``DiagGGNMC``
   (``extend(model, use_converter=True)``, ``CrossEntropyLoss(reduction="sum")``); time
   and peak memory as multiples of one plain forward + backward of the same batch (eval
   mode, summed cross-entropy, every parameter requiring grad). (b) draws the labels of
   (a) (the same seeded generator), (c) with the global RNG seeded alike: the maximum
   relative differences to (a) are printed. An engine that fails is reported, not fatal.

Times interleave the variants (``bench_core.measure``: one warm-up call each, then rounds
in a rotating order); a time is the median over rounds and a ratio the median of the
per-round ratios to the reference of the same round. Peak memory: each engine runs once in
a fresh process, where the added peak resident memory of that one call is Linux's VmHWM
(reset through /proc/self/clear_refs after ``malloc_trim``) minus the RSS before it;
torch's CPU tensors are malloc'd, so RSS sees them (tracemalloc does not).

    python benchmarks/bench_posterior.py [--quick] [--threads N] [--repeats N]
        [--clock wall|cpu] [--samples S] [--json PATH] [--markdown PATH]

``--markdown`` replaces the section "## Posterior fitting" of the file (up to the next
heading of level 1 or 2), or appends it; the rest of the file is kept.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_core  # the timing and peak-memory helpers of the core benchmark

import bnnconvert
from bnnconvert._utils import json_safe
from bnnconvert.curvature import diagonal_ggn
from bnnconvert.data import demo_classification, make_loader
from bnnconvert.layers import convertible_parameters
from bnnconvert.models import resnet18
from bnnconvert.training import train

SECTION = "## Posterior fitting"
R_BAYES = 0.01
BATCH = 50
ENGINE_BATCH = 64
SEED = 0
ENGINES = {
    "plain": "plain forward + backward",
    "tap": "(a) curvature.diagonal_ggn",
    "func": "(b) torch.func vmap(grad)",
    "backpack": "(c) BackPACK DiagGGNMC",
}
QUICK = {"train": 100, "val": 25, "samples": 2, "engine_batch": 4, "repeats": 1}

warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated")
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def _no_sync() -> None:
    """CPU only: nothing to synchronise between timings."""


# ------------------------------------------------------------------------ data
def digits(split: str, count: int | None) -> Dataset:
    """The bundled digits split (28 px, 1 channel), its first ``count`` items if given."""
    data = demo_classification(split)
    return data if count is None else Subset(data, range(count))


def first_batch(size: int) -> tuple[Tensor, Tensor]:
    """The first ``size`` training digits (x (B, 1, 28, 28), y (B,))."""
    loader = make_loader(digits("train", size), size, shuffle=False, seed=SEED)
    return next(iter(loader))


def trained_model(loader) -> nn.Module:
    """ResNet18 for the digits, trained for one epoch (the model whose posterior is fitted)."""
    torch.manual_seed(SEED)
    model = resnet18(10, 1)
    train(model, loader, 1, seed=SEED, progress=False)
    return model


# ------------------------------------------------------------------------ 1. Laplace fit
def laplace_section(model: nn.Module, loader, repeats: int) -> tuple[nn.Module, dict]:
    """Laplace fit at r = 1 % and the full curvature against one training epoch.

    Returns the fitted converted model and the results."""
    saliency = bnnconvert.compute_saliency(model, loader)
    pbnn = bnnconvert.convert(model, saliency, R_BAYES)
    trainee = copy.deepcopy(model)
    reports = []
    calls = {
        "epoch": lambda: train(trainee, loader, 1, progress=False),
        "laplace": lambda: reports.append(bnnconvert.fit_posterior(pbnn, loader, method="laplace")),
        "curvature": lambda: diagonal_ggn(model, loader),
    }
    times = bench_core.measure(calls, repeats, _no_sync)
    last = reports[-1]
    return pbnn, {
        "train_examples": len(loader.dataset),
        "batch_size": loader.batch_size,
        "entries": saliency.num_entries,
        "k": last.num_bayesian,
        "prior_precision": last.prior_precision,
        "epoch_s": statistics.median(times["epoch"]),
        "laplace_s": statistics.median(times["laplace"]),
        "laplace_curvature_s": last.seconds.get("curvature"),
        "curvature_s": statistics.median(times["curvature"]),
        "laplace_ratio": bench_core.paired_ratio(times["laplace"], times["epoch"]),
        "curvature_ratio": bench_core.paired_ratio(times["curvature"], times["epoch"]),
        "rounds": repeats,
    }


# ------------------------------------------------------------------------ 2. calibration
def calibration_section(pbnn: nn.Module, loader, samples: int, repeats: int) -> dict:
    """calibrate_posterior per tried t against one validation pass of S samples."""
    results = []
    calls = {
        "calibrate": lambda: results.append(
            bnnconvert.calibrate_posterior(pbnn, loader, samples=samples)
        ),
        "predict": lambda: bnnconvert.predict(pbnn, loader, samples, progress=False),
    }
    times = bench_core.measure(calls, repeats, _no_sync)
    tried = len(results[-1].curve)
    per_t = [t / tried for t in times["calibrate"]]
    return {
        "val_examples": len(loader.dataset),
        "samples": samples,
        "scales_tried": tried,
        "scale": results[-1].scale,
        "temperature": results[-1].temperature,
        "calibrate_s": statistics.median(times["calibrate"]),
        "predict_s": statistics.median(times["predict"]),
        "per_scale_s": statistics.median(per_t),
        "per_scale_ratio": bench_core.paired_ratio(per_t, times["predict"]),
        "rounds": repeats,
    }


# ------------------------------------------------------------------------ 3. engines
def make_engine(name: str, model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], dict | None]:
    """The call of one engine on (x, y): it returns the GGN diagonal {parameter name:
    tensor} of every Linear/convolution parameter (None for "plain"). The setup (copies,
    BackPACK's extension) happens here, outside the call."""
    model.eval()
    if name == "plain":
        net = copy.deepcopy(model).requires_grad_(True)

        def plain() -> None:
            for p in net.parameters():
                p.grad = None
            F.cross_entropy(net(x), y, reduction="sum").backward()

        return plain
    if name == "tap":
        return lambda: diagonal_ggn(model, [x], seed=SEED).diagonal
    if name == "func":
        return _func_engine(model, x)
    if name == "backpack":
        return _backpack_engine(model, x, y)
    raise ValueError(f"unknown engine {name!r}; one of {', '.join(ENGINES)}")


def _func_engine(model: nn.Module, x: Tensor) -> Callable[[], dict]:
    """Per-example gradients by ``vmap(grad)`` at labels drawn as diagonal_ggn draws them."""
    from torch.func import functional_call, grad, vmap

    net = copy.deepcopy(model).requires_grad_(False)
    theta = {n: p.detach() for n, p in convertible_parameters(net).items()}

    def nll(th: dict, xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(net, th, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0), reduction="sum")

    per_example = vmap(grad(nll), in_dims=(None, 0, 0))

    def run() -> dict:
        with torch.no_grad():
            probs = net(x).softmax(1)
        labels = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(SEED))
        g = per_example(theta, x, labels.squeeze(1))
        return {n: t.square().sum(0) for n, t in g.items()}

    return run


def _backpack_engine(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], dict]:
    """BackPACK's DiagGGNMC on the Linear/convolution parameters (BatchNorm frozen)."""
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNMC

    names = set(convertible_parameters(model))
    net = copy.deepcopy(model)
    for n, p in net.named_parameters():
        p.requires_grad_(n in names)
    net = extend(net, use_converter=True).eval()
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))

    def run() -> dict:
        for p in net.parameters():
            p.grad = None
        torch.manual_seed(SEED)  # BackPACK draws its labels from the global RNG
        with backpack(DiagGGNMC()):
            loss_fn(net(x), y).backward()
        return {n: p.diag_ggn_mc.detach() for n, p in net.named_parameters() if n in names}

    return run


def max_relative_difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """max |a - b| over every entry / max |a|."""
    diff = max(float((a[n].double() - b[n].double()).abs().max()) for n in a)
    return diff / max(float(a[n].abs().max()) for n in a)


def engines_section(model: nn.Module, batch: int, repeats: int, threads: int | None) -> dict:
    """Time, peak memory and agreement of the engines on one batch."""
    x, y = first_batch(batch)
    rows: dict[str, dict] = {name: {"label": label} for name, label in ENGINES.items()}
    calls, diagonals = {}, {}
    for name in ENGINES:
        try:
            call = make_engine(name, model, x, y)
            diagonals[name] = call()  # also checks that the engine works
            calls[name] = call
        except Exception as exc:  # an engine that fails is a result
            rows[name]["error"] = _first_line(exc)
            print(f"engine {name} failed: {rows[name]['error']}", file=sys.stderr)
    if "plain" in calls:
        times = bench_core.measure(calls, repeats, _no_sync)
        for name, ts in times.items():
            rows[name]["seconds"] = statistics.median(ts)
            rows[name]["time_ratio"] = bench_core.paired_ratio(ts, times["plain"])
    for name in ENGINES:
        rows[name].update(run_peak_memory(name, batch, threads))
    plain_peak = rows["plain"].get("peak_bytes")
    for row in rows.values():
        if plain_peak and row.get("peak_bytes") is not None:
            row["peak_ratio"] = row["peak_bytes"] / plain_peak
    for name in ("func", "backpack"):
        if diagonals.get("tap") is not None and diagonals.get(name) is not None:
            rows[name]["max_rel_diff_to_a"] = max_relative_difference(
                diagonals["tap"], diagonals[name]
            )
    return {"batch": batch, "rounds": repeats, "engines": rows}


def engine_peak_memory(name: str, batch: int) -> dict:
    """Peak resident memory added by one call of an engine (run in a fresh process)."""
    torch.manual_seed(SEED)
    model = resnet18(10, 1).eval()
    x, y = first_batch(batch)
    call = make_engine(name, model, x, y)
    gc.collect()
    _malloc_trim()
    before = bench_core.reset_peak()
    call()
    return {"peak_bytes": bench_core.status_kib("VmHWM") * 1024 - before}


def _malloc_trim() -> None:
    """Give glibc's free heap memory back, so that the call's allocations show in RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_peak_memory(name: str, batch: int, threads: int | None) -> dict:
    """engine_peak_memory in a fresh process; {"memory_error": ...} if it failed."""
    cmd = [sys.executable, __file__, "--engine-memory", name, "--batch", str(batch)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"memory_error": f"exit status {proc.returncode}: {tail}"}


# ------------------------------------------------------------------------ report
def targets(laplace: dict, calibration: dict) -> list[dict]:
    """Pass/miss of the posterior issue's cost targets."""
    rows = [
        ("Laplace fit (r = 1 %) / one training epoch", laplace["laplace_ratio"], 2.0),
        ("full-network curvature / one training epoch", laplace["curvature_ratio"], None),
        (
            "calibration per tried t / one validation pass of S samples",
            calibration["per_scale_ratio"],
            1.0,
        ),
    ]
    return [
        {
            "target": label,
            "value": value,
            "limit": limit,
            "pass": None if limit is None else bool(value <= limit),
        }
        for label, value, limit in rows
    ]


def markdown(meta: dict, laplace: dict, calibration: dict, engines: dict, tgt: list) -> str:
    """The section "## Posterior fitting" (ends with a newline)."""
    lap, cal = laplace, calibration
    lines = [
        SECTION,
        "",
        f"`{meta['command']}`",
        "",
        *(f"- {k}: {v}" for k, v in meta.items() if k != "command"),
        "",
        "### Laplace fit and calibration",
        "",
        f"ResNet18 (`resnet18(10, 1)`), {lap['train_examples']:,} training digits in batches "
        f"of {lap['batch_size']}, converted at r_bayes = {R_BAYES:.0%} (grad2): k = "
        f"{lap['k']:,} of {lap['entries']:,} entries, fitted prior precision "
        f"{lap['prior_precision']:.3g}. One training epoch {lap['epoch_s']:.2f} s; the "
        f"Laplace fit {lap['laplace_s']:.2f} s (its curvature pass "
        f"{lap['laplace_curvature_s']:.2f} s); the curvature of every entry "
        f"{lap['curvature_s']:.2f} s. Calibration on {cal['val_examples']} validation "
        f"digits with S = {cal['samples']}: {cal['scales_tried']} scales tried (chosen t = "
        f"{cal['scale']:.3g}, T = {cal['temperature']:.3g}), {cal['calibrate_s']:.2f} s, "
        f"{cal['per_scale_s']:.2f} s per t; one validation pass of S samples "
        f"{cal['predict_s']:.2f} s. Medians of {lap['rounds']} interleaved rounds.",
        "",
        "| target | value | limit | result |",
        "|---|---:|---:|---|",
    ]
    for t in tgt:
        verdict = {True: "pass", False: "MISS", None: "info"}[t["pass"]]
        limit = "" if t["limit"] is None else f"{t['limit']:g}"
        lines.append(f"| {t['target']} | {t['value']:.2f} | {limit} | {verdict} |")
    lines += [
        "",
        f"### Curvature engines (batch {engines['batch']}, every entry, MC Fisher)",
        "",
        "Multiples of one plain forward + backward of the same batch (eval mode, summed "
        "cross-entropy); peak = resident memory added by one call in a fresh process "
        "(VmHWM). Max rel. diff. = max |x - (a)| / max |(a)| over every entry, with the "
        "labels of (a).",
        "",
        "| engine | time s | time x | peak MiB | peak x | max rel. diff. to (a) | note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in engines["engines"].values():
        cells = [
            _fmt(row.get("seconds"), "{:.3f}"),
            _fmt(row.get("time_ratio"), "{:.2f}"),
            _fmt(None if row.get("peak_bytes") is None else row["peak_bytes"] / 2**20, "{:.0f}"),
            _fmt(row.get("peak_ratio"), "{:.2f}"),
            _fmt(row.get("max_rel_diff_to_a"), "{:.1e}"),
            "; ".join(row[k] for k in ("error", "memory_error") if k in row),
        ]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else spec.format(value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


_HEADING = re.compile(r"^#{1,2} ")


def write_section(path: Path, section: str) -> None:
    """Replace the section ``SECTION`` of the markdown file ``path`` (from its heading to the
    next heading of level 1 or 2, or the end) with ``section``, or append it; a missing
    file is created."""
    text = path.read_text() if path.exists() else ""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == SECTION), None)
    if start is None:
        head, tail = text.rstrip("\n"), ""
    else:
        end = next(
            (j for j in range(start + 1, len(lines)) if _HEADING.match(lines[j])), len(lines)
        )
        head, tail = "".join(lines[:start]).rstrip("\n"), "".join(lines[end:])
    parts = [head + "\n\n" if head else "", section, "\n" + tail if tail else ""]
    path.write_text("".join(parts))


def machine_info() -> dict:
    """bench_core's machine line, the load average and the BackPACK version."""
    info = bench_core.machine(torch.device("cpu"))
    info["load average"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    try:
        from importlib.metadata import version

        info["backpack-for-pytorch"] = version("backpack-for-pytorch")
    except Exception:  # not installed: the engine row says so
        info["backpack-for-pytorch"] = "not installed"
    return info


# ------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run on a few digits")
    p.add_argument("--repeats", type=int, default=None, help="rounds per section (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--clock", choices=sorted(bench_core.CLOCK), default="wall", help="wall or cpu")
    p.add_argument("--samples", type=int, default=None, help="S of the calibration (10)")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--markdown", type=Path, help="replace or append the section here")
    p.add_argument("--engine-memory", choices=list(ENGINES), help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=None, help="engine batch (default 64)")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (QUICK["repeats"] if args.quick else 3)
    args.samples = args.samples or (QUICK["samples"] if args.quick else 10)
    args.batch = args.batch or (QUICK["engine_batch"] if args.quick else ENGINE_BATCH)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.engine_memory:  # internal: one engine's peak memory, in a fresh process
        try:
            print(json.dumps(engine_peak_memory(args.engine_memory, args.batch)))
        except Exception as exc:
            print(json.dumps({"memory_error": _first_line(exc)}))
        return {}
    bench_core._clock = bench_core.CLOCK[args.clock]
    meta = {"command": "python benchmarks/bench_posterior.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )}  # fmt: skip
    meta.update(machine_info())
    quick = QUICK if args.quick else {}
    train_loader = make_loader(digits("train", quick.get("train")), BATCH, shuffle=True, seed=SEED)
    val_loader = make_loader(digits("val", quick.get("val")), BATCH, shuffle=False, seed=SEED)
    print("training ResNet18 for one epoch ...", file=sys.stderr)
    model = trained_model(train_loader)
    print("1. Laplace fit against one epoch ...", file=sys.stderr)
    pbnn, laplace = laplace_section(model, train_loader, args.repeats)
    print("2. calibration against one validation pass ...", file=sys.stderr)
    calibration = calibration_section(pbnn, val_loader, args.samples, args.repeats)
    print("3. curvature engines ...", file=sys.stderr)
    engines = engines_section(model, args.batch, args.repeats, args.threads)
    tgt = targets(laplace, calibration)
    report = {
        "meta": meta,
        "laplace": laplace,
        "calibration": calibration,
        "engines": engines,
        "targets": tgt,
    }
    text = markdown(meta, laplace, calibration, engines, tgt)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(json_safe(report), indent=2))
    if args.markdown:
        write_section(args.markdown, text)
    return report


if __name__ == "__main__":
    main()
