"""Peak memory of ``predict_cases`` on 3-D volumes against one deterministic forward.

The claim checked (issue 16): predicting a test set of 64^3 volumes with S = 5 through
:func:`bnnconvert.cases.predict_cases` (streaming, every case's maps written as it is
computed) keeps the peak memory under 2x the activations of ONE deterministic forward of
the same model, i.e. no S x N x C x D x H x W tensor is ever held, and the peak does not
grow with the number of volumes N.

Setup: a small 3-D UNet, ``bnnconvert.models.UNet(1, 2, base=8, depth=1, spatial_dims=3)``:
two stages of two Conv3d-BatchNorm3d-ReLU blocks (8 and 16 channels, max-pool down,
ConvTranspose3d up, a skip connection), 2 classes, 1 x 64^3 input volumes of spheres in
noise. It is converted at r_bayes = 1 % (grad2 saliency on one volume), and its cases are
predicted in batches of one volume, S = 5, with the PNG overlays and the ``.npy`` maps
written (into a temporary folder).

Measured, each in a fresh process (the model, the data and the folder are built and one
warm-up call is made before the measurement, so imports, the hoisting plan and
matplotlib's first-use costs are not counted):

- ``forward``: one forward of the deterministic (unconverted) model on one volume under
  ``torch.no_grad()``: the reference;
- ``cases N=k``: ``predict_cases(pbnn, loader of k volumes, out, samples=5)``, for two
  values of k.

Two peak measures of the memory a call adds on top of what existed before it:

1. **allocator peak**: torch.profiler with ``profile_memory=True`` records every
   allocation and free of PyTorch's CPU allocator; the peak of their running sum is the
   largest total of live tensor bytes during the call (exact, independent of malloc's
   caching; it does not see numpy/matplotlib buffers or oneDNN's internal scratch space);
2. **RSS peak**: Linux's VmHWM (reset through ``/proc/self/clear_refs``) minus the
   resident memory before the call: everything, numpy, matplotlib and library buffers
   included. The subprocesses run with ``MALLOC_MMAP_THRESHOLD_=65536``, so every freed
   block of 64 KiB or more goes back to the system at once and RSS follows the live
   memory instead of glibc's free lists.

Besides, ``activations`` is the sum of the output bytes of every leaf module in the
deterministic forward (what a forward would keep if nothing were freed). The ratio
reported against the 2x target is the peak of ``cases`` over the peak of ``forward``,
measured the same way.

    python benchmarks/bench_predict_memory.py [--quick] [--size 64] [--samples 5]
        [--volumes 2,6] [--threads 1] [--json PATH] [--markdown PATH]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_core  # the machine line and the VmHWM helpers of the core benchmark

import bnnconvert
from bnnconvert._utils import json_safe
from bnnconvert.cases import predict_cases
from bnnconvert.models import UNet

SEED = 0
R_BAYES = 0.01
TARGET = 2.0
MIB = 2**20


# ------------------------------------------------------------------------ setup
def unet3d() -> UNet:
    """The two-stage 3-D UNet: (N, 1, D, H, W) -> logits (N, 2, D, H, W)."""
    return UNet(in_channels=1, num_classes=2, base=8, depth=1, spatial_dims=3)


def volumes(n: int, size: int, seed: int = SEED) -> tuple[Tensor, Tensor]:
    """n volumes (n, 1, size^3) of three random spheres in Gaussian noise, and their masks
    (n, size^3) int64."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.arange(size, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))
    masks = torch.zeros(n, size, size, size, dtype=torch.int64)
    for i in range(n):
        for _ in range(3):
            center = torch.rand(3, 1, 1, 1, generator=g) * size
            radius = size * (0.08 + 0.1 * torch.rand((), generator=g))
            masks[i] |= (((grid - center) ** 2).sum(0) < radius**2).long()
    x = masks[:, None].float() + 0.5 * torch.randn(n, 1, size, size, size, generator=g)
    return x, masks


def build(size: int) -> tuple[nn.Module, nn.Module]:
    """(the deterministic model, eval mode; its conversion at r_bayes = 1 %)."""
    torch.manual_seed(SEED)
    model = unet3d().eval()
    x, y = volumes(1, size, seed=SEED + 1)
    saliency = bnnconvert.compute_saliency(model, [(x, y)])
    return model, bnnconvert.convert(copy.deepcopy(model), saliency, R_BAYES).eval()


# ------------------------------------------------------------------------ measures
def allocator_peak(call: Callable[[], object]) -> int:
    """The peak of live bytes PyTorch's CPU allocator adds during ``call()``."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def rss_peak(call: Callable[[], object]) -> int:
    """Resident memory added at the peak of ``call()`` (VmHWM after a reset, minus RSS)."""
    gc.collect()
    before = bench_core.reset_peak()
    call()
    return bench_core.status_kib("VmHWM") * 1024 - before


def activation_bytes(model: nn.Module, x: Tensor) -> int:
    """The sum of the output bytes of every leaf module in one forward (no grad)."""
    total = 0

    def hook(module: nn.Module, args: object, out: Tensor) -> None:
        nonlocal total
        total += out.numel() * out.element_size()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total


def measure(what: str, size: int, samples: int, n: int) -> dict:
    """One variant, in this (fresh) process: allocator peak, RSS peak, seconds."""
    model, pbnn = build(size)
    if what == "forward":
        x = volumes(1, size)[0]

        def call() -> None:
            with torch.no_grad():
                model(x)

        extra = {"activations": activation_bytes(model, x)}
    else:
        loader = DataLoader(TensorDataset(*volumes(n, size)), batch_size=1)
        root = Path(tempfile.mkdtemp(prefix="bench_predict_memory_"))
        runs = iter(range(10))

        def call() -> None:
            predict_cases(pbnn, loader, root / f"run{next(runs)}", samples=samples, seed=SEED)

        extra = {"volumes": n}
    call()  # warm-up: imports, the hoisting plan, matplotlib's first figure
    t0 = time.perf_counter()
    rss = rss_peak(call)
    seconds = time.perf_counter() - t0
    peak = allocator_peak(call)
    return {"what": what, "allocator_peak": peak, "rss_peak": rss, "seconds": seconds, **extra}


def run_measure(what: str, args: argparse.Namespace, n: int = 1) -> dict:
    """:func:`measure` in a fresh process, glibc returning freed blocks >= 64 KiB at once."""
    options = {
        "--size": args.size,
        "--samples": args.samples,
        "--volumes": n,
        "--threads": args.threads,
    }
    cmd = [sys.executable, __file__, "--measure", what]
    cmd += [str(a) for option in options.items() for a in option]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} measurement failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------ report
def markdown(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    forward = rows[0]
    lines = [
        "# Peak memory of `bnnconvert predict` on 3-D volumes",
        "",
        f"Written by `benchmarks/bench_predict_memory.py` on {meta['date']}: {meta['cpu']}, "
        f"{meta['cores']} cores, {meta['torch threads']} torch thread(s), torch "
        f"{meta['torch']}, Python {meta['python']}, CPU.",
        "",
        f"A two-stage 3-D UNet ({meta['parameters']:,} parameters) on 1 x {meta['size']}^3 "
        f"volumes, converted at r_bayes = {100 * R_BAYES:g} % (grad2), "
        f"`predict_cases(..., samples={meta['samples']})` in batches of one volume, maps and "
        "PNG overlays written. Each row is a fresh process; peaks are the memory a call adds "
        "(allocator: PyTorch's live tensor bytes from torch.profiler; RSS: VmHWM after a "
        "reset, minus RSS before, with `MALLOC_MMAP_THRESHOLD_=65536`). The ratios divide by "
        "the same measure of one deterministic forward.",
        "",
        "| call | allocator peak (MiB) | ratio | RSS peak (MiB) | ratio | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        name = f"predict_cases, N = {row.get('volumes')} volumes, S = {meta['samples']}"
        if row["what"] == "forward":
            name = "one deterministic forward"
        lines.append(
            f"| {name} | {row['allocator_peak'] / MIB:.1f} | "
            f"{row['allocator_peak'] / forward['allocator_peak']:.2f}x | "
            f"{row['rss_peak'] / MIB:.1f} | {row['rss_peak'] / forward['rss_peak']:.2f}x | "
            f"{row['seconds']:.1f} |"
        )
    worst = result["ratio"]
    lines += [
        "",
        f"Activations of the deterministic forward (the sum of every leaf module's output): "
        f"{forward['activations'] / MIB:.1f} MiB; a kept S x N x C x D x H x W probability "
        f"tensor would be {result['kept_samples_bytes'] / MIB:.1f} MiB at the largest N.",
        "",
        f"Target: peak < {TARGET:g}x one deterministic forward. Largest ratio (either "
        f"measure): **{worst:.2f}x**, {'met' if worst < TARGET else 'missed'}.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 16^3, S = 2, N = 1,2")
    p.add_argument("--size", type=int, default=64, help="volume edge (default 64)")
    p.add_argument("--samples", type=int, default=5, help="S (default 5)")
    p.add_argument("--volumes", default="2,6", help="N values, comma-separated (default 2,6)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--json", help="write the results as JSON there")
    p.add_argument("--markdown", help="write the results as markdown there")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: subprocess mode
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.samples, args.volumes = 16, 2, "1,2"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.measure:
        n = int(args.volumes)
        print(json.dumps(measure(args.measure, args.size, args.samples, n)))
        return {}
    counts = [int(v) for v in args.volumes.split(",")]
    rows = [run_measure("forward", args)]
    rows += [run_measure("cases", args, n) for n in counts]
    forward = rows[0]
    ratio = max(
        max(r["allocator_peak"] / forward["allocator_peak"], r["rss_peak"] / forward["rss_peak"])
        for r in rows[1:]
    )
    meta = bench_core.machine(torch.device("cpu"))
    parameters = sum(p.numel() for p in unet3d().parameters())
    meta.update(size=args.size, samples=args.samples, parameters=parameters)
    kept = args.samples * max(counts) * 2 * args.size**3 * 4
    result = {
        "meta": meta,
        "rows": rows,
        "ratio": ratio,
        "target": TARGET,
        "kept_samples_bytes": kept,
    }
    text = markdown(result)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(json_safe(result), indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
