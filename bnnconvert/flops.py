"""FLOP counting with fvcore, on CPU or CUDA: one forward pass, a training step and run.

:func:`count_flops` traces one forward pass with fvcore's ``FlopCountAnalysis`` (which
records the graph with ``torch.jit``'s tracer, without ``torch.jit.trace``'s consistency
check, so the fresh noise a converted model draws in every forward is no obstacle) and
adds op handles for what fvcore does not count by default, so that a converted model
reports no unsupported operator.

Counting conventions (per op; "element" = one element of the tensor named):

==========================================  ===============================================
op                                          FLOPs
==========================================  ===============================================
conv (incl. transposed), linear, addmm,     multiply-adds, fvcore's count: one fused
mm, matmul, bmm, baddbmm, einsum            multiply-add = 1 FLOP (``convention="fma"``);
                                            ``convention="flop"`` doubles these (x2), the
                                            textbook count of torch's FlopCounterMode. Bias
                                            additions are not counted (as in both tools).
batch_norm, group/layer/instance_norm       fvcore's estimates: BatchNorm 2 per element
                                            in eval mode (1 without affine), 5 in training
                                            mode; not scaled by the convention.
upsample nearest / bilinear                 fvcore's: 1 / 4 per output element.
elementwise arithmetic and functions        1 per output element, whatever the function:
(add, sub, mul, div, square, pow, exp,      add of a residual, softplus, exp, log1p, a
log, log1p, softplus, sigmoid, tanh, gelu,  softmax each count 1. Transcendental functions
silu, softmax, ...) and random draws        cost more instructions in practice; this is
(randn_like, normal, rand_like)             the usual one-per-element convention.
reductions and average pooling (sum, mean,  1 per input element.
avg_pool, adaptive_avg_pool)
scaled_dot_product_attention and            the products as multiply-adds (scaled by the
nn.MultiheadAttention's fused fast path     convention), the softmax 1 per score.
scatter_add, index_add (the scatter of the  1 per scattered element (k additions). The
noise onto the selected entries of mu)      out-of-place copy of mu it starts from, and
                                            the gather/write-back of the in-place
                                            variant (index_select, scatter_), are
                                            memory traffic, not arithmetic: 0 FLOPs.
comparisons and selection (relu, max_pool,  0, following fvcore, which already ignores
hardtanh, clamp, max), shape and memory ops relu, clamp, max, cat, view, reshape, index,
(view, reshape, cat, index, to, ...)        to, copy and friends.
==========================================  ===============================================

So the Bayesian overhead of a converted layer is what it computes: per forward, for its k
selected entries, k softplus + k multiplies by the sigma scale t + k normal draws + k
multiplies + k additions (scatter_add in the sparse case, a dense add when every entry is
Bayesian) = 5k FLOPs, paid once per
forward pass whatever the batch size. The sampling is attributed to the layer that owns
the weights (also inside modules such as ``nn.MultiheadAttention`` that sample on behalf
of their children) and reported separately as ``FlopReport.bayes_overhead``.

Counting runs on a deep copy of the model (moved to ``device`` if given), so the user's
model keeps its device, mode, buffers and parameters; the copy costs one model's memory.
Inputs may be keyword tensors (a mapping, ``model(**inputs)``) and outputs any structure:
the copy is called through a thin wrapper that fvcore's tracer can follow (positional
tensors in; a tensor, tuple, list or dict out, other outputs read as their logits by
:class:`bnnconvert.BatchFormat`); the wrapper adds no FLOP and no module name.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ._utils import (
    BatchFormat,
    Inputs,
    as_batch_format,
    call_model,
    check_positive_int,
    first_line,
    model_device,
)
from .convert import num_bayesian
from .elbo import kl_loss
from .layers import BayesianLayer, bayesian_layers
from .sampling import hoist_plan

with warnings.catch_warnings():  # fvcore.nn scripts a loss at import: a FutureWarning
    warnings.simplefilter("ignore")
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

__all__ = [
    "BACKWARD_FACTOR",
    "FlopReport",
    "TrainingCost",
    "convention_note",
    "count_flops",
    "count_prediction_flops",
    "format_flops",
    "training_cost",
]

logger = logging.getLogger(__name__)

CONVENTIONS: dict[str, int] = {"fma": 1, "flop": 2}
"""FLOPs per multiply-add: "fma" (fvcore, one fused multiply-add = 1), "flop" (x2)."""

MAC_OPS = frozenset({"conv", "linear", "addmm", "mm", "matmul", "bmm", "baddbmm", "einsum"})
"""fvcore's names of the multiply-add ops, the ones the convention scales."""

BACKWARD_FACTOR = 2.0
"""Backward cost in forwards: gradients w.r.t. activations and w.r.t. weights each cost
about one forward (each conv/linear needs two products of the forward's size)."""

_ELEMENTWISE_OPS = (
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "neg", "abs",
    "square", "pow", "sqrt", "rsqrt", "reciprocal", "exp", "log", "log1p", "expm1",
    "softplus", "sigmoid", "sigmoid_", "tanh", "tanh_", "gelu", "silu", "silu_", "elu",
    "elu_", "leaky_relu", "leaky_relu_", "hardswish", "hardswish_", "hardsigmoid", "mish",
    "softmax", "log_softmax", "randn_like", "rand_like", "normal", "normal_", "randn", "rand",
)  # fmt: skip
_REDUCTION_OPS = (
    "sum", "mean", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool3d",
)  # fmt: skip
_ZERO_OPS = (
    "relu", "relu_", "hardtanh", "hardtanh_", "max_pool1d", "max_pool2d", "max_pool3d",
    "max_pool2d_with_indices", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "view_as", "reshape_as", "expand_as", "clone", "where",
    "unflatten", "index_select", "index_copy", "index_copy_", "index_put", "scatter",
    "scatter_", "new_ones", "numpy_T",
)  # fmt: skip

SAMPLING_SCOPE = "flops_sampling_scope"
"""Name under which a Bayesian layer's sampling is traced (a temporary child module)."""


# ---------------------------------------------------------------------------- op handles
def _numel(value) -> int:
    """Number of elements of a traced tensor value (0 if its shape is unknown)."""
    shape = get_shape(value)
    return 0 if shape is None else math.prod(shape)


def _per_output(inputs: list, outputs: list) -> int:
    return _numel(outputs[0])


def _per_input(inputs: list, outputs: list) -> int:
    return _numel(inputs[0])


def _scatter_add(inputs: list, outputs: list) -> int:
    """aten::scatter_add(self, dim, index, src) and aten::index_add(self, dim, index,
    source, alpha): one add per source element; the copy of ``self`` (mu) into the
    output is memory traffic, counted 0."""
    return _numel(inputs[3])


def _baddbmm(inputs: list, outputs: list) -> int:
    """aten::baddbmm(self, b1 (n, c, t), b2 (n, t, d)): n*c*t*d multiply-adds."""
    n, c, t = get_shape(inputs[1])
    return n * c * t * get_shape(inputs[2])[-1]


def _attention(inputs: list, outputs: list) -> Counter:
    """aten::scaled_dot_product_attention(q (..., L, E), k (..., S, E), v (..., S, Ev)):
    q k^T and the weighting of v are multiply-adds, the softmax 1 per score."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    scores = math.prod(q[:-1]) * k[-2]
    return Counter({"matmul": scores * (q[-1] + v[-1]), "softmax": scores})


def _native_mha(inputs: list, outputs: list) -> Counter:
    """aten::_native_multi_head_attention (nn.MultiheadAttention's inference fast path,
    batch first): q/k/v and output projections plus the attention itself."""
    (n, length, embed), source = get_shape(inputs[0]), get_shape(inputs[1])[1]
    heads = inputs[4].toIValue()
    projections = n * (length + 2 * source) * embed * embed + n * length * embed * embed
    scores = n * heads * length * source
    return Counter({"linear": projections, "matmul": 2 * scores * (embed // heads),
                    "softmax": scores})  # fmt: skip


def _op_handles() -> dict[str, Callable | None]:
    """The handles added to fvcore's defaults (None: explicitly 0 FLOPs)."""
    handles: dict[str, Callable | None] = {f"aten::{op}": _per_output for op in _ELEMENTWISE_OPS}
    handles.update({f"aten::{op}": _per_input for op in _REDUCTION_OPS})
    handles.update({f"aten::{op}": None for op in _ZERO_OPS})
    handles.update({
        "aten::scatter_add": _scatter_add,  # a Bayesian layer's draw: mu + noise on k entries
        "aten::scatter_add_": _scatter_add,
        "aten::index_add": _scatter_add,
        "aten::index_add_": _scatter_add,
        "aten::baddbmm": _baddbmm,
        "aten::scaled_dot_product_attention": _attention,
        "aten::_native_multi_head_attention": _native_mha,
    })  # fmt: skip
    return handles


def _analysis(module: nn.Module, inputs: tuple) -> FlopCountAnalysis:
    """A quiet FlopCountAnalysis with our handles: unsupported ops are returned, not logged."""
    fca = FlopCountAnalysis(module, inputs).set_op_handle(**_op_handles())
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return fca.tracer_warnings("none")


# ---------------------------------------------------------------------------- the report
@dataclass(frozen=True)
class FlopReport:
    """FLOPs of ``samples`` forward passes of a model on one input batch.

    Every count is for the whole batch and already multiplied by ``samples``; multiply-adds
    follow ``convention`` ("fma": fvcore's one fused multiply-add = 1 FLOP; "flop": x2).

    Attributes:
        total: FLOPs of ``samples`` forwards, Bayesian overhead included.
        by_module: {module name: FLOPs}, "" is the whole model; a module includes its
            descendants and, for a Bayesian layer, its sampling.
        by_operator: {op name: FLOPs} over the whole model.
        bayes_overhead: FLOPs of drawing the weights (softplus, noise, multiply, add) in
            the Bayesian layers; 0 for a deterministic model.
        bayes_by_module: {Bayesian layer name: its sampling FLOPs}.
        bayes_by_operator: {op name: sampling FLOPs}.
        unsupported_ops: {op: occurrences in one forward} that no handle counted (0 FLOPs
            assumed); empty for converted Linear/Conv networks.
        bayesian_entries: k, the number of Bayesian weight entries.
        samples, convention, train: how the count was made (``train``: training-mode
            forward, e.g. BatchNorm with batch statistics).
        input_shapes: the shapes of the traced inputs; device: where they were traced.
    """

    total: int
    by_module: dict[str, int]
    by_operator: dict[str, int]
    bayes_overhead: int
    bayes_by_module: dict[str, int]
    bayes_by_operator: dict[str, int]
    unsupported_ops: dict[str, int]
    bayesian_entries: int
    samples: int
    convention: str
    train: bool
    input_shapes: tuple[tuple[int, ...], ...]
    device: str
    model_name: str = ""

    @property
    def per_forward(self) -> int:
        """FLOPs of one forward pass (``total / samples``)."""
        return self.total // self.samples

    @property
    def deterministic_part(self) -> int:
        """FLOPs of the ``samples`` forwards without the Bayesian sampling."""
        return self.total - self.bayes_overhead

    def table(self, max_depth: int | None = None) -> str:
        """The per-module table (modules down to ``max_depth`` dots; 0-FLOP rows omitted)."""
        rows = [
            (name or "(total)", flops, self.bayes_by_module.get(name, 0))
            for name, flops in self.by_module.items()
            if (flops or not name) and (max_depth is None or name.count(".") < max_depth)
        ]
        width = max(len(r[0]) for r in rows)
        sampling = self.bayes_overhead > 0  # the column only for Bayesian models
        lines = [
            f"{'module':<{width}}  {'FLOPs':>12}" + ("  Bayesian sampling" if sampling else "")
        ]
        for name, flops, overhead in rows:
            extra = f"  {format_flops(overhead):>17}" if overhead else ""
            lines.append(f"{name:<{width}}  {format_flops(flops):>12}{extra}")
        return "\n".join(lines)

    def header(self) -> str:
        """Two lines: what was counted, and the convention."""
        shapes = ", ".join(str(s) for s in self.input_shapes)
        mode = "training" if self.train else "eval"
        return (
            f"FLOPs of {self.model_name or 'the model'}: input {shapes} on {self.device}, "
            f"{mode} mode, x {self.samples} forward pass(es)\n{convention_note(self.convention)}"
        )

    def summary(self) -> str:
        """The total, the Bayesian overhead and the unsupported operators, one line each."""
        share = 100.0 * self.bayes_overhead / self.total if self.total else 0.0
        unsupported = ", ".join(f"{op} x{n}" for op, n in self.unsupported_ops.items())
        return "\n".join([
            f"total: {self.total:,} FLOPs ({format_flops(self.total)})",
            f"Bayesian overhead: {self.bayes_overhead:,} FLOPs ({share:.2f} % of the total) "
            f"for k = {self.bayesian_entries:,} Bayesian entries",
            f"unsupported operators (counted as 0): {unsupported or 'none'}",
        ])  # fmt: skip

    def __str__(self) -> str:
        return f"{self.header()}\n\n{self.table()}\n\n{self.summary()}"


def format_flops(n: float) -> str:
    """1234567 -> '1.23 M'."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def convention_note(convention: str) -> str:
    """One line saying what a FLOP is under ``convention`` ("fma" or "flop")."""
    if convention == "fma":
        return "convention 'fma': one fused multiply-add = 1 FLOP (fvcore); 'flop' gives x2"
    return "convention 'flop': one multiply-add = 2 FLOPs (textbook, FlopCounterMode)"


# ---------------------------------------------------------------------------- counting
def count_flops(
    model: nn.Module,
    inputs: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
    *,
    samples: int = 1,
    device: str | torch.device | None = None,
    convention: str = "fma",
    train: bool = False,
    batch_format: BatchFormat | None = None,
) -> FlopReport:
    """FLOPs of ``samples`` forward passes of ``model`` on ``inputs``, counted by fvcore.

    Args:
        model: any nn.Module, deterministic, converted by bnnconvert, or bayesian-torch.
            It is not modified: the count runs on a deep copy (one model's memory).
        inputs: a batch (N, ...), a tuple of positional inputs, or a mapping of keyword
            inputs ``{"pixel_values": (N, ...)}``; counts are for the whole batch. The
            Bayesian sampling is paid once per forward, whatever N.
        samples: S, the number of stochastic forwards (Monte Carlo samples); every count
            is multiplied by S.
        device: where to count ("cpu", "cuda", ...); default: where the model is.
        convention: "fma" (fvcore: one fused multiply-add = 1 FLOP) or "flop" (x2 for
            multiply-adds, the textbook count); elementwise ops count 1 either way.
        train: count a training-mode forward (BatchNorm on batch statistics) instead
            of an eval-mode one.
        batch_format: its ``output_fn`` reads an output that is not a tensor, tuple, list
            or dict (default: ``.logits``); see :class:`bnnconvert.BatchFormat`.

    Returns a :class:`FlopReport`; ``str(report)`` is a per-module table. Raises
    ValueError if the model rejects the inputs.
    """
    check_positive_int(samples=samples)
    factor = _convention_factor(convention)
    work, inputs, keys = _working_copy(model, inputs, device, train)
    markers = {_marker_name(name): name for name in _instrument_sampling(work)}
    root = _Called(work, keys, as_batch_format(batch_format))
    fca = _analysis(root, inputs)
    raw = _unwrapped(_traced(fca, root, inputs).by_module_and_operator())
    sampling = _sampling_counts(raw, work, markers)

    def weigh(counts: Mapping[str, float]) -> int:
        return _weigh(counts, factor) * samples

    report = FlopReport(
        total=weigh(raw[""]),
        by_module={n: weigh(c) for n, c in raw.items() if n not in markers},
        by_operator={op: weigh({op: v}) for op, v in raw[""].items()},
        bayes_overhead=sum(weigh(c) for c in sampling.values()),
        bayes_by_module={layer: weigh(c) for layer, c in sampling.items()},
        bayes_by_operator={
            op: weigh({op: v}) for op, v in sum(sampling.values(), Counter()).items()
        },
        unsupported_ops=dict(fca.unsupported_ops()),
        bayesian_entries=_bayesian_entries(work),
        samples=samples,
        convention=convention,
        train=train,
        input_shapes=tuple(tuple(x.shape) for x in inputs if isinstance(x, Tensor)),
        device=str(_device_of(work)),
        model_name=type(model).__name__,
    )
    _log_unsupported(report.unsupported_ops)
    return report


def _convention_factor(convention: str) -> int:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {sorted(CONVENTIONS)}, got {convention!r}")
    return CONVENTIONS[convention]


def _weigh(counts: Mapping[str, float], factor: int) -> int:
    """Sum of per-op counts, multiply-add ops scaled by the convention factor."""
    return round(sum(v * (factor if op in MAC_OPS else 1) for op, v in counts.items()))


def _device_of(model: nn.Module) -> torch.device:
    """Where the model is (the CPU for one without tensors)."""
    return model_device(model) or torch.device("cpu")


def _working_copy(
    model: nn.Module, inputs: Tensor | Sequence[Tensor] | Mapping[str, Tensor], device, train: bool
) -> tuple[nn.Module, tuple, tuple[str, ...] | None]:
    """A deep copy of ``model`` on ``device`` in the requested mode, the inputs there (as a
    tuple) and their keyword names (None: positional inputs)."""
    work = copy.deepcopy(model)
    if device is not None:
        work.to(device)
    work.train(train)
    target = _device_of(work)
    keys = None
    if isinstance(inputs, Mapping):
        keys, inputs = tuple(inputs), tuple(inputs.values())
    inputs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    moved = tuple(x.to(target) if isinstance(x, Tensor) else x for x in inputs)
    return work, moved, keys


_WRAPPED = "model"
"""The name of the counted model inside :class:`_Called` (stripped from the counts)."""


class _Called(nn.Module):
    """Calls the model with positional or keyword inputs and returns what fvcore's tracer
    (torch.jit) can follow: a tensor, tuple, list or dict as it is, any other output
    (a dataclass) read as its logits by ``fmt``."""

    def __init__(self, model: nn.Module, keys: tuple[str, ...] | None, fmt: BatchFormat):
        super().__init__()
        self.add_module(_WRAPPED, model)
        self.keys = keys
        self.fmt = fmt

    def forward(self, *inputs: Any) -> Any:
        model = self.get_submodule(_WRAPPED)
        out = model(*inputs) if self.keys is None else model(**dict(zip(self.keys, inputs)))
        return out if isinstance(out, (Tensor, tuple, list, dict)) else self.fmt.output(out)


def _unwrapped(raw: Mapping[str, Counter]) -> dict[str, Counter]:
    """Counts by module of a :class:`_Called` trace, named as in the model itself."""
    prefix = f"{_WRAPPED}."
    out = {"": raw[""]}
    out.update({name[len(prefix) :]: c for name, c in raw.items() if name.startswith(prefix)})
    return out


class _SamplingScope(nn.Module):
    """Stands in for a Bayesian layer's ``sample_parameter`` (``kronecker_sample`` for a
    Kronecker-factored layer) in the counting copy: called through nn.Module.__call__, it
    makes fvcore attribute the sampling ops to the module '<layer>.flops_sampling_scope',
    whoever triggers the sampling (the layer or an owner)."""

    def __init__(self, sample: Callable[..., Tensor | tuple[Tensor, ...]]):
        super().__init__()
        self.sample = sample

    def forward(self, *name: str) -> Tensor | tuple[Tensor, ...]:
        return self.sample(*name)


def _instrument_sampling(work: nn.Module) -> list[str]:
    """Route every Bayesian layer's sampling of ``work`` (a throwaway copy) through a
    :class:`_SamplingScope` child; return the names of the Bayesian layers."""
    names = []
    for name, layer in list(bayesian_layers(work)):
        method = "kronecker_sample" if layer.is_kronecker else "sample_parameter"
        scope = _SamplingScope(getattr(layer, method))
        layer.add_module(SAMPLING_SCOPE, scope)
        layer.__dict__[method] = scope  # the instance attribute wins
        names.append(name)
    return names


def _marker_name(layer_name: str) -> str:
    return f"{layer_name}.{SAMPLING_SCOPE}" if layer_name else SAMPLING_SCOPE


def _is_foreign_variational(module: nn.Module) -> bool:
    """A variational layer of another library (bayesian-torch): it has a kl_loss method and
    rho* parameters of its own, and samples its weights inside its own forward."""
    if isinstance(module, BayesianLayer) or not callable(getattr(module, "kl_loss", None)):
        return False
    return any(n.startswith("rho") for n, _ in module.named_parameters(recurse=False))


def _sampling_counts(
    raw: Mapping[str, Counter], work: nn.Module, markers: Mapping[str, str]
) -> dict[str, Counter]:
    """{Bayesian layer: per-op FLOPs of drawing its weights}: everything traced in the
    sampling scope of a bnnconvert layer; everything but the multiply-adds in the scope
    of a bayesian-torch layer (exp, log1p, normal, mul, add)."""
    out = {layer: raw[marker] for marker, layer in markers.items()}
    for name, module in work.named_modules():
        if _is_foreign_variational(module):
            out[name] = Counter({op: v for op, v in raw[name].items() if op not in MAC_OPS})
    return out


def _bayesian_entries(model: nn.Module) -> int:
    """k: bnnconvert's Bayesian entries plus the rho entries of bayesian-torch layers."""
    foreign = sum(
        p.numel()
        for m in model.modules()
        if _is_foreign_variational(m)
        for n, p in m.named_parameters(recurse=False)
        if n.startswith("rho")
    )
    return num_bayesian(model) + foreign


def _traced(fca: FlopCountAnalysis, model: nn.Module, inputs: tuple) -> FlopCountAnalysis:
    """Run the trace; if it fails because the model rejects the inputs, say so plainly."""
    try:
        with torch.no_grad():
            fca.total()
    except Exception as exc:
        _raise_if_rejected(model, inputs)
        raise RuntimeError(f"fvcore could not trace {type(model).__name__}: {exc}") from exc
    return fca


def _raise_if_rejected(model: nn.Module, inputs: tuple) -> None:
    """Raise a short ValueError if a plain forward of ``model`` on ``inputs`` fails."""
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:  # the user's model may raise anything
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs if isinstance(x, Tensor))
        raise ValueError(
            f"the model rejected an input of shape {shapes}: {first_line(exc)}; "
            "pass inputs=... matching the model"
        ) from None


def _log_unsupported(ops: Mapping[str, int]) -> None:
    if ops:
        listed = ", ".join(f"{op} x{n}" for op, n in ops.items())
        logger.warning("operators without a FLOP count (counted as 0): %s", listed)


# ---------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainingCost:
    """FLOPs of training: per step = (1 + backward_factor) x (S forwards + one KL), per run
    = steps x per step + the saliency pass.

    Attributes:
        forward: a training-mode forward (one sample) of the model, see :class:`FlopReport`.
        kl: FLOPs of one KL evaluation (0 for a deterministic model).
        samples: S, the Monte Carlo samples per step; steps: the optimiser steps of the run.
        backward_factor: the backward pass in forwards (default 2: the gradients w.r.t.
            the activations and w.r.t. the weights each cost about one forward).
        saliency_batches: the batches of the saliency pass (forward + backward of the
            deterministic network each); 0 when not counted.
    """

    forward: FlopReport
    kl: int
    samples: int
    steps: int
    backward_factor: float
    saliency_batches: int
    unsupported_ops: dict[str, int] = field(default_factory=dict)

    @property
    def step_forward(self) -> int:
        """FLOPs of the forward part of one step: S forwards + the KL."""
        return self.samples * self.forward.total + self.kl

    @property
    def per_step(self) -> int:
        """FLOPs of one training step, forward and backward."""
        return round((1 + self.backward_factor) * self.step_forward)

    @property
    def saliency(self) -> int:
        """FLOPs of the saliency pass: forward + backward of the deterministic network."""
        per_batch = (1 + self.backward_factor) * self.forward.deterministic_part
        return round(self.saliency_batches * per_batch)

    @property
    def per_run(self) -> int:
        """FLOPs of ``steps`` steps plus the saliency pass."""
        return self.steps * self.per_step + self.saliency

    def __str__(self) -> str:
        return "\n".join([
            self.forward.header(),
            f"one forward: {format_flops(self.forward.total)} (Bayesian sampling "
            f"{format_flops(self.forward.bayes_overhead)}), KL: {format_flops(self.kl)}",
            f"per step: (1 + {self.backward_factor:g} backward) x ({self.samples} samples x "
            f"forward + KL) = {self.per_step:,} FLOPs ({format_flops(self.per_step)})",
            f"saliency pass: {self.saliency_batches} batches x forward+backward = "
            f"{format_flops(self.saliency)}",
            f"per run: {self.steps} steps + saliency = {self.per_run:,} FLOPs "
            f"({format_flops(self.per_run)})",
        ])  # fmt: skip


def training_cost(
    model: nn.Module,
    inputs: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
    *,
    samples: int = 1,
    steps: int = 1,
    backward_factor: float = BACKWARD_FACTOR,
    saliency_batches: int = 0,
    device: str | torch.device | None = None,
    convention: str = "fma",
    batch_format: BatchFormat | None = None,
) -> TrainingCost:
    """FLOPs of training ``model``: per step (1 + backward_factor) x (S forwards + KL).

    Args:
        model: deterministic, converted (KL of :func:`bnnconvert.kl_loss`) or bayesian-torch
            (KL of its ``get_kl_loss``); not modified.
        inputs: one training batch (N, ...): the sampling overhead is paid per forward,
            so use the batch size of the training loop.
        samples: S, Monte Carlo samples per step (the paper uses 5; 1 for deterministic).
        steps: optimiser steps of the run (epochs x batches per epoch).
        backward_factor: cost of the backward pass in forwards. Default 2.0: the gradient
            w.r.t. the activations and the gradient w.r.t. the weights each cost about one
            forward (two products of the forward's size per conv/linear).
        saliency_batches: batches of the saliency pass to add (forward + backward each, on
            the deterministic network, i.e. the forward without the sampling).
        device, convention, batch_format: as in :func:`count_flops`.

    The forward is counted in training mode (BatchNorm on batch statistics).
    """
    check_positive_int(samples=samples, steps=steps)
    if backward_factor < 0 or saliency_batches < 0:
        raise ValueError("backward_factor and saliency_batches must be >= 0")
    forward = count_flops(
        model, inputs, device=device, convention=convention, train=True, batch_format=batch_format
    )
    kl, kl_unsupported = _kl_flops(model, device)
    return TrainingCost(
        forward, kl, samples, steps, backward_factor, saliency_batches,
        unsupported_ops=dict(Counter(forward.unsupported_ops) + Counter(kl_unsupported)),
    )  # fmt: skip


class _KLStep(nn.Module):
    """Calls ``kl_fn(model)``: lets fvcore trace the KL term of a training step."""

    def __init__(self, model: nn.Module, kl_fn: Callable[[nn.Module], Tensor]):
        super().__init__()
        self.model = model
        self.kl_fn = kl_fn

    def forward(self) -> Tensor:
        return self.kl_fn(self.model)


def _kl_function(model: nn.Module) -> Callable[[nn.Module], Tensor] | None:
    """bnnconvert's kl_loss for converted models, bayesian-torch's get_kl_loss for models
    with other ``kl_loss`` layers, None for deterministic models."""
    if any(isinstance(m, BayesianLayer) for m in model.modules()):
        return kl_loss
    if any(_is_foreign_variational(m) for m in model.modules()):
        from bayesian_torch.models.dnn_to_bnn import get_kl_loss

        return get_kl_loss
    return None


def _kl_flops(model: nn.Module, device) -> tuple[int, dict[str, int]]:
    """FLOPs and unsupported ops of one KL evaluation (elementwise ops only: no convention)."""
    kl_fn = _kl_function(model)
    if kl_fn is None:
        return 0, {}
    work, _, _ = _working_copy(model, (), device, train=True)  # fvcore leaves hooks on errors
    fca = _analysis(_KLStep(work, kl_fn), ())
    with torch.no_grad():
        total = fca.total()
    _log_unsupported(fca.unsupported_ops())
    return round(total), dict(fca.unsupported_ops())


def count_prediction_flops(
    model: nn.Module,
    inputs: Inputs,
    samples: int,
    *,
    convention: str = "fma",
    batch_format: BatchFormat | None = None,
) -> int:
    """FLOPs of one Monte Carlo prediction of ``samples`` draws, as
    :func:`bnnconvert.sampling.mc_outputs` runs it: where torch.fx can split the model,
    the deterministic prefix once and the stochastic suffix ``samples`` times; otherwise
    ``samples`` full forwards (the same as ``count_flops(model, inputs,
    samples=samples).total``). Eval mode, ``inputs`` one batch (N, ...) or keyword inputs.

    A model whose Bayesian entries sit in its last layer costs about one forward whatever
    ``samples``; one with entries in its first layer, ``samples`` forwards.
    """
    check_positive_int(samples=samples)
    work = copy.deepcopy(model).eval()
    count = partial(count_flops, convention=convention, batch_format=batch_format)
    plan = hoist_plan(work)
    if plan is None or not plan.accepts(inputs):
        return count(work, inputs, samples=samples).total
    with torch.no_grad():
        hoisted = call_model(plan.prefix, inputs)
    prefix = count(plan.prefix, inputs).total
    suffix = count(plan.suffix, tuple(hoisted)).total
    return prefix + samples * suffix
