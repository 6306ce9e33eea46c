"""Curvature of the likelihood at the trained weights: per-example GGN diagonals.

The diagonal Laplace posterior of :func:`bnnconvert.fit_posterior` needs, for every
Bayesian entry i, the diagonal of the generalized Gauss-Newton matrix of the negative
log-likelihood summed over the training data,

    H_ii = sum_n sum_p  J_np[:, i]^T  Lambda_np  J_np[:, i],

with J_np the Jacobian of the model output at position p (a pixel for segmentation, the
single output of a classifier) of example n, and Lambda_np the Hessian of the NLL in the
output (softmax: diag(p) - p p^T; sigmoid: p (1 - p); Gaussian: 1 / noise^2). Two
estimators:

- ``"mc"`` (default): the Monte Carlo Fisher. For each example a target is drawn from the
  model's own predictive (one per position) and the squared per-example gradient of its
  NLL is accumulated: E[g g^T] = J^T Lambda J, so the estimate is unbiased, also for
  segmentation (the residuals of different pixels are independent and zero-mean). Cost:
  about one backward pass per example (``mc_samples`` of them).
- ``"exact"``: one backward pass per output column of a square root of Lambda (C for a
  C-class classifier). Outputs with spatial dimensions are refused (it would be one per
  pixel and class).

Both need *per-example* gradients: the square must be taken before summing over examples.
Linear and convolution layers (any dimensionality, stride, dilation, groups, padding mode,
transposed) are handled in one backward pass per batch: a forward hook keeps each layer's
input and taps its output, the backward pass records the gradient of the output (the
parameters' ``.grad`` is never touched), and the per-example squared gradients are formed
from those two factors (as BackPACK and Opacus do): a single matrix product of squares
where a layer sees one position per example (a classifier's last layers), per-example
products otherwise, or only the selected entries when ``masks`` are given and that is
cheaper. On ResNet18 (batches of 64 digits, every entry) this takes 3.2 times a plain
forward and backward pass and 2.5 times its peak memory, against 11 and 6 times for
BackPACK's ``DiagGGNMC`` and 38 and 29 times for ``torch.func``'s ``vmap(grad)``, all three
exact (``benchmarks/bench_posterior.py``, docs/benchmarks.md). A layer called more than once per
forward (weight sharing), or a selected parameter of another kind (attention in_proj,
recurrent, embedding, raw parameters: see :data:`bnnconvert.layers.PARAMETER_KINDS`),
makes the whole pass fall back to ``torch.func`` per-example gradients, which is exact for
any architecture whose forward ``torch.func.vmap`` can batch, but slow.

The model runs in eval mode (BatchNorm with its running statistics: the model that
predicts) and, if converted, at its means.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from tqdm.auto import tqdm

from ._utils import (
    BatchFormat,
    Inputs,
    as_batch_format,
    batch_length,
    call_arguments,
    call_model,
    eval_mode,
    move_inputs,
)
from .kronecker import augment
from .layers import (
    PARAM_NAMES,
    PARAMETER_KINDS,
    convertible_parameters,
    is_convertible,
    is_pointwise,
    mean_weights,
)

__all__ = [
    "LIKELIHOODS",
    "Curvature",
    "KroneckerCurvature",
    "diagonal_ggn",
    "fit_prior_precision",
    "kronecker_ggn",
    "laplace_sigma",
    "likelihood_of_task",
    "log_marginal_likelihood",
]

log = logging.getLogger(__name__)

LIKELIHOODS = ("categorical", "bernoulli", "gaussian")
"""categorical: softmax over dim 1 of (N, C, *spatial) logits (multi-class, segmentation);
bernoulli: a sigmoid per output entry (multi-label, binary); gaussian: regression with a
fixed noise standard deviation."""

_TASK_LIKELIHOOD = {
    "multiclass": "categorical",
    "segmentation": "categorical",
    "multilabel": "bernoulli",
    "regression": "gaussian",
}

_MAX_CHUNK_ELEMENTS = 2**25
"""Largest per-example gradient block (batch x entries) formed at once (128 MB float32)."""


def likelihood_of_task(task: str | None) -> str:
    """The likelihood of a task name ("multiclass", "segmentation" -> "categorical",
    "multilabel" -> "bernoulli", "regression" -> "gaussian"); None -> "categorical"."""
    if task is None:
        return "categorical"
    if task not in _TASK_LIKELIHOOD:
        raise ValueError(f"task must be one of {', '.join(_TASK_LIKELIHOOD)}, got {task!r}")
    return _TASK_LIKELIHOOD[task]


@dataclass
class Curvature:
    """The GGN diagonal of the NLL summed over a data set.

    Attributes:
        diagonal: {parameter name: tensor of the parameter's shape}; entries outside the
            ``masks`` given to :func:`diagonal_ggn` hold 0.
        num_data: N, the number of examples summed over.
        likelihood, method: how it was computed (see the module docstring).
        seconds: wall time of the pass.
    """

    diagonal: dict[str, Tensor]
    num_data: int
    likelihood: str
    method: str
    seconds: float = math.nan


def diagonal_ggn(
    model: nn.Module,
    data: Iterable,
    *,
    likelihood: str = "categorical",
    names: Iterable[str] | None = None,
    masks: Mapping[str, Tensor] | None = None,
    method: str = "mc",
    mc_samples: int = 1,
    noise_std: float = 1.0,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
    batch_format: BatchFormat | None = None,
) -> Curvature:
    """The diagonal of the GGN of the NLL over ``data``, summed over examples.

    Args:
        model: the trained model (deterministic or converted: converted layers run at their
            means). It is left as found: parameters, ``.grad``, ``requires_grad``, modes.
        data: batches: input tensors or (input, target, ...) sequences (the targets are not
            used: the Fisher draws its own from the model). Outputs: (N, C, *spatial)
            logits for "categorical", (N, L, *spatial) for "bernoulli", any for "gaussian".
        likelihood: one of :data:`LIKELIHOODS` (see :func:`likelihood_of_task`).
        names: the parameters to compute (state_dict names of floating-point parameters,
            any kind); default every one of :func:`bnnconvert.layers.convertible_parameters`
            (its default kinds).
        masks: {name: bool tensor of the parameter's shape}: compute only these entries
            (the others hold 0); overrides ``names``.
        method: "mc" (Monte Carlo Fisher, any output) or "exact" (outputs without spatial
            dimensions only).
        mc_samples: targets drawn per example for "mc".
        noise_std: the noise standard deviation of the "gaussian" likelihood.
        seed: seeds the targets drawn for "mc" (a private generator: the global RNG is
            not touched).
        device: where to run (default: where the model is).
        progress: a tqdm bar over the batches.
        batch_format: how to read mapping batches and structured outputs
            (:class:`bnnconvert.BatchFormat`).

    Returns a :class:`Curvature` (float32 tensors on the model's device).
    """
    _check(likelihood, method, mc_samples, noise_std)
    fmt = as_batch_format(batch_format)
    if names is None and masks is None:
        names = list(convertible_parameters(model))
    params = convertible_parameters(model, include=PARAMETER_KINDS)
    selected = _selection(params, names, masks)
    engine = _TapEngine(model, selected, fmt)
    start = time.perf_counter()
    count = _run(engine, data, likelihood, method, mc_samples, noise_std, seed, device, progress)
    return Curvature(engine.result(), count, likelihood, method, time.perf_counter() - start)


def _run(engine, data, likelihood, method, mc_samples, noise_std, seed, device, progress) -> int:
    """Feed every batch of ``data`` to ``engine`` (the model frozen, in eval mode, at its
    means); returns the number of examples N."""
    model, fmt = engine.model, engine.fmt
    device = torch.device(device) if device is not None else next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    count = 0
    with _frozen(model), eval_mode(model), mean_weights(model):
        for batch in tqdm(data, desc="curvature", unit="batch", disable=not progress):
            x, _ = fmt.split(batch)
            x = move_inputs(x, device)
            count += batch_length(x)
            engine.accumulate(x, likelihood, method, mc_samples, noise_std, generator)
    if count == 0:
        raise ValueError("the data yielded no batch; pass a non-empty iterable of batches")
    return count


@dataclass
class KroneckerCurvature:
    """The Kronecker factors of the GGN of Linear layers and 1x1 convolutions (see
    :mod:`bnnconvert.kronecker`).

    Attributes:
        factors: {layer name: (A (P, P), B (C, C))}: A the mean of phi~ phi~^T over the
            input rows (phi~ the layer's input with a 1 appended if it has a bias; a row per
            example, or per example and position for a 1x1 convolution), B the sum over
            the rows of the GGN of the NLL in the layer's output.
        num_data, likelihood, method, seconds: as in :class:`Curvature`.
    """

    factors: dict[str, tuple[Tensor, Tensor]]
    num_data: int
    likelihood: str
    method: str
    seconds: float = math.nan


def kronecker_ggn(
    model: nn.Module,
    data: Iterable,
    layers: Iterable[str],
    *,
    likelihood: str = "categorical",
    method: str = "exact",
    mc_samples: int = 1,
    noise_std: float = 1.0,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
    batch_format: BatchFormat | None = None,
) -> KroneckerCurvature:
    """The K-FAC factors of the GGN of the NLL over ``data`` for the named Linear layers
    or 1x1 convolutions (:func:`bnnconvert.layers.is_pointwise`).

    One forward per batch (hooks keep each layer's input) and one backward per residual of
    :func:`diagonal_ggn` ("exact": C columns of a square root of the output Hessian, so B
    is exact for the last layer; "mc": ``mc_samples`` drawn targets). A Linear layer must
    take (N, in_features) inputs, a 1x1 convolution contributes a row per position, and
    each layer must be called once per forward. Arguments as for :func:`diagonal_ggn`;
    ``layers``: module names (converted or not).

    Raises ValueError for an unknown or unsuitable layer name, an empty ``layers``, a
    layer called more than once per forward, or Linear inputs with extra dimensions.

    Returns a :class:`KroneckerCurvature` (float64 factors on the model's device).
    """
    _check(likelihood, method, mc_samples, noise_std)
    fmt = as_batch_format(batch_format)
    engine = _KroneckerEngine(model, list(layers), fmt)
    start = time.perf_counter()
    count = _run(engine, data, likelihood, method, mc_samples, noise_std, seed, device, progress)
    factors = engine.factors()
    return KroneckerCurvature(factors, count, likelihood, method, time.perf_counter() - start)


def _check(likelihood: str, method: str, mc_samples: int, noise_std: float) -> None:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {', '.join(LIKELIHOODS)}, got {likelihood!r}")
    if method not in ("mc", "exact"):
        raise ValueError(f"method must be 'mc' or 'exact', got {method!r}")
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be an integer >= 1, got {mc_samples!r}")
    if not (math.isfinite(noise_std) and noise_std > 0):
        raise ValueError(f"noise_std must be a positive number, got {noise_std!r}")


def _selection(
    params: Mapping[str, nn.Parameter],
    names: Iterable[str] | None,
    masks: Mapping[str, Tensor] | None,
) -> dict[str, Tensor | None]:
    """{name: flat int64 indices of the entries to compute, or None for every entry}."""
    if masks is not None:
        chosen = {}
        for name, mask in masks.items():
            _known(name, params)
            if tuple(mask.shape) != tuple(params[name].shape):
                raise ValueError(
                    f"the mask of {name!r} has shape {tuple(mask.shape)}, the parameter "
                    f"{tuple(params[name].shape)}; pass masks made for this model"
                )
            flat = mask.reshape(-1).to(params[name].device, torch.bool)
            chosen[name] = flat.nonzero().squeeze(1)
        if not any(idx.numel() for idx in chosen.values()):
            raise ValueError("the masks select no entry; pass at least one True entry")
        return chosen
    chosen_names = list(params) if names is None else list(names)
    for name in chosen_names:
        _known(name, params)
    if not chosen_names:
        raise ValueError("names is empty; pass at least one parameter name")
    return dict.fromkeys(chosen_names)


def _known(name: str, params: Mapping[str, nn.Parameter]) -> None:
    if name not in params:
        raise ValueError(
            f"{name!r} is not a floating-point parameter of this model; pass names from "
            "bnnconvert.layers.convertible_parameters(model)"
        )


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """No parameter requires grad inside the block (the pass never builds their grads)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


# ------------------------------------------------------------------ output residuals
def _residuals(
    out: Tensor, likelihood: str, method: str, mc_samples: int, noise_std: float, gen
) -> Iterator[Tensor]:
    """Vectors r (shape of ``out``) with sum_r r r^T = Lambda per position (exact) or
    E[r r^T] = Lambda (mc, one r per draw, scaled by 1/sqrt(mc_samples))."""
    out = out.detach().float()
    if method == "exact":
        if out.dim() != 2:
            raise ValueError(
                f"method='exact' needs outputs (N, C) without spatial dimensions, got "
                f"{tuple(out.shape)}; use method='mc' (unbiased) for dense outputs"
            )
        yield from _exact_columns(out, likelihood, noise_std)
        return
    scale = 1 / math.sqrt(mc_samples)
    for _ in range(mc_samples):
        yield _mc_residual(out, likelihood, noise_std, gen) * scale


def _mc_residual(out: Tensor, likelihood: str, noise_std: float, gen) -> Tensor:
    """d NLL / d output at a target drawn from the model's predictive."""
    if likelihood == "categorical":
        if out.dim() < 2:
            raise ValueError(
                f"categorical outputs need a class dimension 1, got {tuple(out.shape)}"
            )
        probs = out.softmax(1)
        flat = probs.movedim(1, -1).reshape(-1, probs.shape[1])
        drawn = torch.multinomial(flat, 1, generator=gen).squeeze(1)
        onehot = F.one_hot(drawn, probs.shape[1]).to(probs.dtype)
        return probs - onehot.reshape(*probs.movedim(1, -1).shape).movedim(-1, 1)
    if likelihood == "bernoulli":
        p = out.sigmoid()
        return p - torch.bernoulli(p, generator=gen)
    noise = torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)
    return -noise / noise_std


def _exact_columns(out: Tensor, likelihood: str, noise_std: float) -> Iterator[Tensor]:
    """The columns of a square root of Lambda, one output column at a time."""
    if likelihood == "categorical":
        p = out.softmax(1)
        eye = torch.eye(p.shape[1], device=p.device, dtype=p.dtype)
        for c in range(p.shape[1]):  # sqrt(p_c) (e_c - p): sum_c = diag(p) - p p^T
            yield p[:, c : c + 1].sqrt() * (eye[c] - p)
        return
    diag = out.sigmoid() * (1 - out.sigmoid()) if likelihood == "bernoulli" else None
    for c in range(out.shape[1]):
        col = torch.zeros_like(out)
        col[:, c] = diag[:, c].sqrt() if diag is not None else 1 / noise_std
        yield col


# ------------------------------------------------------------------ the tap engine
class _Tap(torch.autograd.Function):
    """Identity whose backward hands the output gradient to a callback."""

    @staticmethod
    def forward(ctx, x: Tensor, record) -> Tensor:
        ctx.record = record
        return x.clone()  # a new tensor: later in-place ops modify the clone, not x

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.record(grad)
        return grad, None


class _TapEngine:
    """Per-example squared gradients of Linear/convolution parameters, batch by batch."""

    def __init__(
        self, model: nn.Module, selected: Mapping[str, Tensor | None], fmt: BatchFormat
    ) -> None:
        self.model = model
        self.fmt = fmt
        modules = dict(model.named_modules())
        self.layers: dict[str, dict[str, Tensor | None]] = {}
        for name, idx in selected.items():
            layer, _, tensor = name.rpartition(".")
            self.layers.setdefault(layer, {})[tensor] = idx
        self.modules = {name: modules[name] for name in self.layers}
        self.index = dict(selected)
        params = convertible_parameters(model, include=PARAMETER_KINDS)
        self.acc = {
            name: torch.zeros(p.numel(), device=p.device, dtype=torch.float32)
            for name, p in params.items()
            if name in selected
        }
        self.shapes = {name: params[name].shape for name in self.acc}
        # only Linear/convolution weights and biases have output taps
        self.tapped = all(
            is_convertible(self.modules[layer]) and set(tensors) <= set(PARAM_NAMES)
            for layer, tensors in self.layers.items()
        )

    def result(self) -> dict[str, Tensor]:
        return {name: acc.view(self.shapes[name]) for name, acc in self.acc.items()}

    def accumulate(self, x, likelihood, method, mc_samples, noise_std, gen) -> None:
        if not self.tapped:
            self._per_example_func(x, likelihood, method, mc_samples, noise_std, gen)
            return
        inputs: dict[str, Tensor] = {}
        grads: dict[str, Tensor] = {}
        roots: list[Tensor] = []
        calls: dict[str, int] = dict.fromkeys(self.layers, 0)
        with ExitStack() as stack:
            for name, module in self.modules.items():
                hook = module.register_forward_hook(self._hook(name, inputs, grads, roots, calls))
                stack.callback(hook.remove)
            out = self.fmt.output(call_model(self.model, x))
        shared = [name for name, n in calls.items() if n > 1]
        if shared:
            self._per_example_func(x, likelihood, method, mc_samples, noise_std, gen)
            return
        for r in _residuals(out, likelihood, method, mc_samples, noise_std, gen):
            torch.autograd.grad(
                out, roots, grad_outputs=r.to(out.dtype), retain_graph=True, allow_unused=True
            )
            for name, module in self.modules.items():
                g = grads.pop(name, None)
                if g is not None:  # None: the layer does not influence the output
                    self._add(name, module, inputs[name], g)

    def _hook(self, name, inputs, grads, roots, calls):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            calls[name] += 1
            inputs[name] = args[0].detach()
            if not output.requires_grad:  # no tapped layer upstream: the graph starts here
                output = output.detach().requires_grad_(True)
            roots.append(output)
            return _Tap.apply(output, lambda g: grads.__setitem__(name, g.detach()))

        return hook

    def _add(self, layer: str, module: nn.Module, a: Tensor, g: Tensor) -> None:
        for tensor, idx in self.layers[layer].items():
            if idx is not None and idx.numel() == 0:
                continue
            acc = self.acc[f"{layer}.{tensor}" if layer else tensor]
            if tensor == "bias":
                _add_squares(acc, _bias_gradients(module, g.float()), idx)
            else:
                left, right = _factors(module, a.float(), g.float())
                _add_weight_squares(acc, left, right, idx)

    def _per_example_func(self, x, likelihood, method, mc_samples, noise_std, gen) -> None:
        """Exact per-example gradients by torch.func (shared layers): slow, general."""
        from torch.func import functional_call, grad, vmap

        log.info(
            "a layer is called several times per forward, or a selected parameter has no "
            "output tap (not a Linear/convolution weight or bias): per-example gradients by "
            "torch.func"
        )
        params = convertible_parameters(self.model, include=PARAMETER_KINDS)
        theta = {name: params[name].detach() for name in self.acc}
        with torch.no_grad():
            out = self.fmt.forward(self.model, x)

        def project(th, xi: Inputs, ri):
            if isinstance(xi, Mapping):  # one example: a batch of 1
                args, kwargs = call_arguments({k: v.unsqueeze(0) for k, v in xi.items()})
            else:
                args, kwargs = call_arguments(xi.unsqueeze(0))
            return (self.fmt.output(functional_call(self.model, th, args, kwargs))[0] * ri).sum()

        per_example = vmap(grad(project), in_dims=(None, 0, 0))
        for r in _residuals(out, likelihood, method, mc_samples, noise_std, gen):
            g = per_example(theta, x, r.to(out.dtype))
            for name, acc in self.acc.items():
                _add_squares(acc, g[name].float().reshape(batch_length(x), -1), self.index[name])


class _KroneckerEngine(_TapEngine):
    """The tap engine accumulating sum phi~ phi~^T and sum g g^T per Linear layer."""

    def __init__(self, model: nn.Module, layers: list[str], fmt: BatchFormat) -> None:
        modules = dict(model.named_modules())
        for name in layers:
            module = modules.get(name)
            if module is None or not is_pointwise(module):
                kind = "no module" if module is None else f"a {type(module).__name__}"
                raise ValueError(
                    f"{name!r} is {kind}; a Kronecker-factored GGN needs Linear layers or "
                    "1x1 convolutions (stride 1, no padding, one group)"
                )
        if not layers:
            raise ValueError("layers is empty; name at least one Linear layer or 1x1 convolution")
        super().__init__(model, {f"{name}.weight": None for name in layers}, fmt)
        self.kron: dict[str, list[Tensor]] = {}
        self.rows: dict[str, int] = dict.fromkeys(self.modules, 0)
        self._seen: dict[str, Tensor] = {}
        for name, module in self.modules.items():
            out, width = module.weight.shape[0], module.weight.shape[1] + (module.bias is not None)
            dev = module.weight.device
            self.kron[name] = [
                torch.zeros(width, width, device=dev, dtype=torch.float64),
                torch.zeros(out, out, device=dev, dtype=torch.float64),
            ]

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """{layer: (A = sum phi~ phi~^T / rows, B = sum g g^T)}."""
        return {name: (a / self.rows[name], b) for name, (a, b) in self.kron.items()}

    def _add(self, layer: str, module: nn.Module, a: Tensor, g: Tensor) -> None:
        if isinstance(module, nn.Linear) and a.dim() != 2:
            raise ValueError(
                f"{layer!r} receives inputs of shape {tuple(a.shape)}; a Kronecker-factored "
                "GGN needs (N, in_features) inputs (a classifier's last layer); use "
                "covariance='diagonal'"
            )
        acc_a, acc_b = self.kron[layer]
        if self._seen.get(layer) is not a:  # A once per batch, B once per residual
            self._seen[layer] = a
            phi = augment(_rows(a, module).double(), module.bias is not None)
            acc_a += phi.T @ phi
            self.rows[layer] += phi.shape[0]
        g = _rows(g, module).double()
        acc_b += g.T @ g

    def _per_example_func(self, *args) -> None:
        raise ValueError(
            "a Kronecker-factored GGN needs each layer called once per forward (no weight "
            "sharing); use covariance='diagonal'"
        )


def _rows(x: Tensor, module: nn.Module) -> Tensor:
    """(rows, channels): a Linear layer's (N, features), or a 1x1 convolution's
    (N, C, *spatial) with every position a row."""
    if isinstance(module, nn.Linear):
        return x
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def _bias_gradients(module: nn.Module, g: Tensor) -> Tensor:
    """Per-example bias gradients (B, out features): the output gradient summed over
    positions (Linear: every dimension but the batch and the last; convolutions: space)."""
    if isinstance(module, nn.Linear):
        return g.reshape(g.shape[0], -1, g.shape[-1]).sum(1)
    return g.reshape(g.shape[0], g.shape[1], -1).sum(2)


def _add_squares(acc: Tensor, per_example: Tensor, idx: Tensor | None) -> None:
    """acc[idx] += sum_b per_example[b, idx]^2; per_example (B, numel)."""
    if idx is None:
        acc += per_example.square().sum(0)
    else:
        acc.index_add_(0, idx, per_example[:, idx].square().sum(0))


def _factors(module: nn.Module, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """The two factors of a layer's per-example weight gradient.

    Returns (left (B, G, P, L), right (B, G, Q, L)) with the per-example gradient of the
    weight, viewed as (G, P, Q), equal to left @ right^T over the L positions:
    Linear: (output gradient, input); convolution: (output gradient, unfolded input);
    transposed convolution: (input, unfolded output gradient).
    """
    b = a.shape[0]
    if isinstance(module, nn.Linear):
        left = g.reshape(b, -1, g.shape[-1]).transpose(1, 2).unsqueeze(1)
        right = a.reshape(b, -1, a.shape[-1]).transpose(1, 2).unsqueeze(1)
        return left, right
    if not isinstance(module, _ConvNd):
        raise TypeError(f"{type(module).__name__} is not a Linear or convolution layer")
    groups = module.groups
    if module.transposed:
        left = a.reshape(b, groups, a.shape[1] // groups, -1)
        unfolded = _unfold(g, module)
        right = unfolded.reshape(b, groups, -1, unfolded.shape[-1])[..., : left.shape[-1]]
        return left, right
    left = g.reshape(b, groups, g.shape[1] // groups, -1)
    unfolded = _unfold(a, module)
    return left, unfolded.reshape(b, groups, -1, unfolded.shape[-1])


def _unfold(x: Tensor, module: _ConvNd) -> Tensor:
    """The convolution's input patches: (B, C, *S) -> (B, C * prod(kernel), L)."""
    nd = x.dim() - 2
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    pads: list[int] = []
    for i in reversed(range(nd)):  # F.pad order: last dimension first
        if module.padding == "valid":
            before = after = 0
        elif module.padding == "same":
            total = dilation[i] * (kernel[i] - 1)
            before, after = total // 2, total - total // 2
        else:
            before = after = module.padding[i]
        pads += [before, after]
    if any(pads):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pads, mode=mode)
    for i in range(nd):
        span = dilation[i] * (kernel[i] - 1) + 1
        x = x.unfold(2 + i, span, stride[i])[..., :: dilation[i]]
    b, c = x.shape[:2]
    positions = math.prod(x.shape[2 : 2 + nd])
    x = x.permute(0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))
    return x.reshape(b, c * math.prod(kernel), positions)


def _add_weight_squares(acc: Tensor, left: Tensor, right: Tensor, idx: Tensor | None) -> None:
    """acc += sum_b (left_b right_b^T)^2 over the selected flat entries of (G, P, Q)."""
    b, groups, p, positions = left.shape
    q = right.shape[2]
    if idx is not None and idx.numel() * positions < groups * p * q:
        gi, rest = idx // (p * q), idx % (p * q)
        per_example = (left[:, gi, rest // q, :] * right[:, gi, rest % q, :]).sum(-1)
        acc.index_add_(0, idx, per_example.square().sum(0))
        return
    if positions == 1:  # sum_b l^2 r^2: one matrix product of squares
        full = torch.einsum("bgp,bgq->gpq", left[..., 0].square(), right[..., 0].square())
    else:
        step = max(1, _MAX_CHUNK_ELEMENTS // (groups * p * q))
        full = torch.zeros(groups, p, q, device=left.device, dtype=left.dtype)
        for i in range(0, b, step):
            full += (
                torch.matmul(left[i : i + step], right[i : i + step].transpose(-1, -2))
                .square_()
                .sum(0)
            )
    full = full.reshape(-1)
    if idx is None:
        acc += full
    else:
        acc.index_add_(0, idx, full[idx])


# ------------------------------------------------------------------ the Laplace evidence
_LOG_LAMBDA_RANGE = (-30.0, 30.0)


def log_marginal_likelihood(
    curvature: Tensor, theta: Tensor, prior_precision: float, log_likelihood: float = 0.0
) -> float:
    """The Laplace approximation of log p(D) for a diagonal posterior over k entries,

        log p(D | theta) - lambda / 2 |theta|^2 + k / 2 log lambda - 1/2 sum_i log(H_i + lambda)

    (the 2 pi terms cancel), exact for a linear-Gaussian model with a diagonal Hessian.

    Args:
        curvature: H (k,), the GGN diagonal of the NLL summed over the data.
        theta: (k,) the entries at the mode (the trained weights).
        prior_precision: lambda > 0 of the prior N(0, 1 / lambda).
        log_likelihood: log p(D | theta); it only shifts the value (default 0).
    """
    lam = float(prior_precision)
    if not (math.isfinite(lam) and lam > 0):
        raise ValueError(f"prior_precision must be a positive number, got {prior_precision!r}")
    h, th = curvature.double().clamp_min(0), theta.double()
    return float(
        log_likelihood
        - lam / 2 * th.square().sum()
        + h.numel() / 2 * math.log(lam)
        - 0.5 * torch.log(h + lam).sum()
    )


def fit_prior_precision(curvature: Tensor, theta: Tensor) -> float:
    """The prior precision lambda that maximises :func:`log_marginal_likelihood`.

    The objective is strictly concave in log lambda: its derivative times 2,
    k - lambda |theta|^2 - sum_i lambda / (H_i + lambda), falls from (number of entries with
    H_i > 0) at lambda -> 0 to -inf, and its root is found by bisection in log lambda
    (float64). If no entry has curvature the evidence prefers an infinitely wide prior:
    then a ValueError asks for a given prior precision.

    Args:
        curvature: H (k,); theta: (k,), as for :func:`log_marginal_likelihood`.
    """
    h = curvature.double().clamp_min(0)
    th2 = float(theta.double().square().sum())
    k = h.numel()
    if k == 0:
        raise ValueError("no entry to fit a prior precision on")

    def slope(log_lam: float) -> float:
        lam = math.exp(log_lam)
        return k - lam * th2 - float((lam / (h + lam)).sum())

    lo, hi = _LOG_LAMBDA_RANGE
    if slope(hi) > 0:  # theta ~ 0: the data prefer the narrowest prior on the range
        return math.exp(hi)
    if slope(lo) <= 0:
        raise ValueError(
            "the marginal likelihood prefers an infinitely wide prior: the data do not "
            "constrain these entries (their curvature is 0); pass a prior precision"
        )
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if slope(mid) > 0 else (lo, mid)
    return math.exp((lo + hi) / 2)


def laplace_sigma(curvature: Tensor, prior_precision: float) -> Tensor:
    """The diagonal Laplace posterior's standard deviations 1 / sqrt(H + lambda), in the
    dtype of ``curvature`` (any shape)."""
    lam = float(prior_precision)
    if not (math.isfinite(lam) and lam > 0):
        raise ValueError(f"prior_precision must be a positive number, got {prior_precision!r}")
    return (curvature.double().clamp_min(0) + lam).rsqrt().to(curvature.dtype)
