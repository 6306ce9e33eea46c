"""Masked reparameterized layers: one mechanism for every floating-point parameter.

A converted layer is the same object with a generated subclass of its original class
(the approach of ``torch.nn.utils.parametrize``), so ``isinstance`` checks and every
hyperparameter (stride, padding, padding_mode, dilation, groups, output_padding, dtype,
device, requires_grad) survive untouched. The module may be of any type: a Linear or
convolution ("weight", "bias"), ``nn.MultiheadAttention`` ("in_proj_weight",
"in_proj_bias", "q_proj_weight", ...), a recurrent layer ("weight_ih_l0", "bias_hh_l0",
...), an Embedding, or a custom module holding a raw ``nn.Parameter`` that its forward
reads as ``self.<name>`` (see :data:`PARAMETER_KINDS` for which kinds are scored by
default). For each parameter tensor ``name`` that has selected entries, the layer holds:

- ``name``: the posterior mean mu, the pretrained tensor itself, under its original key;
- ``name_rho``: Parameter of shape (k,), sigma = softplus(rho) for the k selected entries;
- ``name_idx``: buffer of shape (k,), the flat indices of those entries, int32 when the
  parameter has fewer than 2**31 entries, else int64 (empty when every entry is selected,
  the dense case); checkpoints with int64 indices load into either;

one float64 buffer ``bayes_prior`` = (prior_mu, prior_sigma), and one scalar buffer
``bayes_scale`` = t that multiplies every sigma of the layer (1 after conversion; set by
:func:`set_sigma_scale`, e.g. by :func:`bnnconvert.calibrate_posterior`; t = 0 samples the
means). Deterministic entries carry no noise. Each forward draws fresh noise,
sigma * eps for the k entries, and uses w = mu + scatter(idx, sigma * eps):

- with gradients (training), w is a new tensor (a copy of mu plus the O(k) scatter), so
  gradients flow to mu and rho;
- without gradients (prediction, ``torch.no_grad``/``inference_mode``) and k <= N / 16,
  mu itself is perturbed in place for the duration of the forward and its k original
  values are written back afterwards (bit-identical; autograd's version counter is not
  touched): O(k) memory and time. The samples equal those of the copying path under the
  same seed.

Within a :func:`posterior_cache` block (every Monte Carlo loop of the package runs in one),
sigma = softplus(rho) is computed once instead of at every forward, and the in-place path
gathers the k original values once: the S draws of a prediction or an ELBO step share
that work, with bit-identical samples.

The sample replaces the parameter for the duration of the module's own forward, which
therefore must read it as ``self.<name>`` (every torch.nn layer does). Recurrent layers
notice the swap themselves (``nn.RNNBase`` re-reads its flat weight list, and re-flattens
it for cuDNN, when a weight tensor was replaced).

Some modules read a child layer's parameters directly instead of calling it
(``nn.MultiheadAttention`` reads ``out_proj.weight``; ``nn.TransformerEncoderLayer``'s
fast path reads its linears and its attention's in_proj). Such a module becomes a sampling
*owner*: its forward swaps the sampled tensors into its Bayesian descendants for the
duration of the call. A module of another kind whose parameters are read by a parent's
code (not by its own forward) needs its parent's class added to :data:`DIRECT_READERS`.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd

from . import kronecker

__all__ = [
    "DEFAULT_INCLUDE",
    "PARAMETER_KINDS",
    "BayesianLayer",
    "bayesian_layers",
    "bayesian_masks",
    "convertible_parameters",
    "is_convertible",
    "make_bayesian",
    "make_deterministic",
    "mean_weights",
    "parameter_kinds",
    "posterior_cache",
    "set_sigma_scale",
    "sigma_scale",
]

CONVERTIBLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, _ConvNd)
"""Linear and its subclasses (NonDynamicallyQuantizableLinear included), Conv1d/2d/3d,
ConvTranspose1d/2d/3d and their subclasses."""

PARAM_NAMES = ("weight", "bias")

PARAMETER_KINDS = ("linear", "conv", "attention", "recurrent", "embedding", "norm", "other")
"""The kinds of floating-point parameters, by the module holding them:

- "linear": weight and bias of ``nn.Linear`` (and subclasses) and ``nn.Bilinear``;
- "conv": weight and bias of Conv1d/2d/3d, ConvTranspose1d/2d/3d (and subclasses);
- "attention": ``nn.MultiheadAttention``'s in_proj_weight, in_proj_bias, q/k/v_proj_weight
  (when kdim or vdim differ from embed_dim), bias_k, bias_v (its out_proj is "linear");
- "recurrent": the weights and biases of RNN, LSTM, GRU (every layer and direction) and of
  RNNCell, LSTMCell, GRUCell;
- "embedding": the weight of ``nn.Embedding`` and ``nn.EmbeddingBag``;
- "norm": the affine parameters of normalisation layers (BatchNorm, InstanceNorm,
  LayerNorm, GroupNorm, RMSNorm);
- "other": any other parameter, e.g. a custom module's ``self.scale = nn.Parameter(...)``,
  a ViT's class token or position embedding, PReLU's slope.
"""

DEFAULT_INCLUDE = ("linear", "conv", "attention", "recurrent", "embedding")
"""The kinds scored and converted by default: normalisation layers and "other" parameters
are opt-in (``include=(..., "norm", "other")`` or a name pattern)."""

_ATTENTION_NAMES = frozenset(
    {"in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight",
     "bias_k", "bias_v"}
)  # fmt: skip
_CELL_NAMES = frozenset({"weight_ih", "weight_hh", "bias_ih", "bias_hh"})
_NORM_TYPES = (_NormBase, nn.LayerNorm, nn.GroupNorm, *filter(None, [getattr(nn, "RMSNorm", None)]))
"""BatchNorm, InstanceNorm, SyncBatchNorm (all ``_NormBase``), LayerNorm, GroupNorm and
RMSNorm (torch >= 2.4)."""

# Modules whose forward reads the parameters of their child layers directly.
DIRECT_READERS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention, nn.TransformerEncoderLayer)

_MIN_SIGMA = 1e-6

_Perturbed = tuple[Tensor, Tensor, Tensor]
"""(mu flattened (N,), original values (k,), int64 indices (k,)) of an in-place draw."""


class _CachedSigma(NamedTuple):
    """sigma = t * softplus(rho) (k,) of one tensor, valid while rho, the scale t and the
    stamp match."""

    rho: Tensor
    scale: Tensor
    stamp: tuple  # (rho's version, t's version, grad mode, autocast state)
    sigma: Tensor


class _CachedIndex(NamedTuple):
    """The int64 copy (k,) of one tensor's index buffer ``idx``."""

    idx: Tensor
    long: Tensor


class _CachedMu(NamedTuple):
    """The flat view (N,) of mu and its k original values, valid while mu, its version
    and the index buffer are the same."""

    mu: Tensor
    idx: Tensor
    version: int
    flat: Tensor
    original: Tensor


INPLACE_MAX_FRACTION = 1 / 16
"""Without gradients, a tensor with k <= INPLACE_MAX_FRACTION * numel Bayesian entries is
perturbed in place; denser ones are copied (a copy of mu is then cheaper than the
gather + scatter + write-back of k entries)."""


def is_convertible(module: nn.Module) -> bool:
    """True for an initialised Linear/Conv/ConvTranspose layer (of any subclass)."""
    if not isinstance(module, CONVERTIBLE_TYPES):
        return False
    return not any(
        isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters(False)
    )


def parameter_kind(module: nn.Module, name: str) -> str:
    """The kind (one of :data:`PARAMETER_KINDS`) of ``module``'s parameter ``name``."""
    if isinstance(module, (nn.Linear, nn.Bilinear)) and name in PARAM_NAMES:
        return "linear"
    if isinstance(module, _ConvNd) and name in PARAM_NAMES:
        return "conv"
    if isinstance(module, nn.MultiheadAttention) and name in _ATTENTION_NAMES:
        return "attention"
    if (isinstance(module, nn.RNNBase) and name in module._flat_weights_names) or (
        isinstance(module, nn.RNNCellBase) and name in _CELL_NAMES
    ):
        return "recurrent"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and name == "weight":
        return "embedding"
    if isinstance(module, _NORM_TYPES) and name in PARAM_NAMES:
        return "norm"
    return "other"


def _model_parameters(model: nn.Module) -> Iterator[tuple[str, str, nn.Parameter]]:
    """(state_dict name, kind, parameter) of every initialised floating-point parameter of
    ``model``, in ``named_parameters()`` order; a parameter shared by several modules is
    listed once, under its first name. The rho of converted tensors is not listed: a
    converted model lists the same parameters (mu) as the model it was converted from."""
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        internal = (
            {f"{n}_rho" for n in module.bayes_names} if isinstance(module, BayesianLayer) else ()
        )
        for p_name, p in module._parameters.items():
            if p is None or id(p) in seen or p_name in internal:
                continue
            seen.add(id(p))
            if isinstance(p, nn.parameter.UninitializedParameter) or not p.is_floating_point():
                continue
            yield (
                (f"{mod_name}.{p_name}" if mod_name else p_name),
                parameter_kind(module, p_name),
                p,
            )


def parameter_kinds(model: nn.Module) -> dict[str, str]:
    """{state_dict name: kind} of every floating-point parameter of ``model`` (see
    :data:`PARAMETER_KINDS`), whether or not it is scored by default."""
    return {name: kind for name, kind, _ in _model_parameters(model)}


def check_selection(
    include: str | Iterable[str] | None, exclude: str | Iterable[str] | None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``include`` and ``exclude`` as tuples of strings (None: :data:`DEFAULT_INCLUDE` and
    nothing); a single string is one item. Raises TypeError for anything else."""
    out = []
    for arg, value, default in (
        ("include", include, DEFAULT_INCLUDE),
        ("exclude", exclude, ()),
    ):
        items = default if value is None else (value,) if isinstance(value, str) else value
        try:
            items = tuple(items)
        except TypeError:
            items = (items,)
        if not all(isinstance(item, str) and item for item in items):
            raise TypeError(
                f"{arg} must be parameter kinds ({', '.join(PARAMETER_KINDS)}) or glob patterns "
                f"of parameter names (e.g. 'encoder.*.weight'), got {value!r}"
            )
        out.append(items)
    return out[0], out[1]


def _selects(items: tuple[str, ...], name: str, kind: str) -> bool:
    """True if one of ``items`` is ``kind`` or a glob pattern matching ``name``."""
    return any(
        item == kind if item in PARAMETER_KINDS else fnmatch.fnmatchcase(name, item)
        for item in items
    )


def convertible_parameters(
    model: nn.Module,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> dict[str, nn.Parameter]:
    """The parameters that are scored and may be made Bayesian, keyed by state_dict name.

    Args:
        model: any module (converted or not: a converted model lists its mu tensors).
        include: parameter kinds (:data:`PARAMETER_KINDS`) and/or glob patterns of state_dict
            names (``fnmatch``: "encoder.*.in_proj_weight", "*.scale"); a parameter is listed
            if it matches one of them. Default :data:`DEFAULT_INCLUDE`: every weight and
            bias of Linear, convolution, attention, recurrent and embedding layers.
        exclude: kinds or patterns removed from that selection (default: nothing).

    Only floating-point, initialised parameters are listed; a parameter shared by several
    modules is listed once, under its first name. A pattern that matches no floating-point
    parameter of the model raises ValueError (a misspelt name would otherwise select
    nothing silently).
    """
    include, exclude = check_selection(include, exclude)
    everything = list(_model_parameters(model))
    for item in (*include, *exclude):
        if item not in PARAMETER_KINDS and not any(
            fnmatch.fnmatchcase(name, item) for name, _, _ in everything
        ):
            raise ValueError(
                f"{item!r} is neither a parameter kind ({', '.join(PARAMETER_KINDS)}) nor a "
                f"pattern matching a parameter name of {type(model).__name__} (e.g. "
                f"{everything[0][0] if everything else 'weight'!r}); see "
                "bnnconvert.layers.parameter_kinds(model)"
            )
    return {
        name: p
        for name, kind, p in everything
        if _selects(include, name, kind) and not _selects(exclude, name, kind)
    }


def require_parameters(
    model: nn.Module,
    include: str | Iterable[str] | None,
    exclude: str | Iterable[str] | None,
    action: str,
) -> dict[str, nn.Parameter]:
    """:func:`convertible_parameters`, or a ValueError naming the model's kinds when the
    selection is empty (``action``: what needed them, e.g. "score")."""
    params = convertible_parameters(model, include, exclude)
    if not params:
        include, exclude = check_selection(include, exclude)
        raise ValueError(
            f"{type(model).__name__} has no Linear/Conv/ConvTranspose layer or other parameter "
            f"selected by include={list(include)}, exclude={list(exclude)} to {action}; its "
            f"parameter kinds are {sorted(set(parameter_kinds(model).values()))} (see "
            "bnnconvert.layers.PARAMETER_KINDS)"
        )
    return params


def softplus_inverse(sigma: Tensor) -> Tensor:
    """rho such that softplus(rho) = sigma (sigma > 0), stable for small and large sigma."""
    return sigma + torch.log(-torch.expm1(-sigma))


class BayesianLayer:
    """Mixin placed before the original class in a converted layer's MRO.

    Not instantiated directly: :func:`make_bayesian` turns an existing layer into one.
    """

    bayes_names: tuple[str, ...]
    bayes_sampling: bool
    _bayes_active: bool
    _bayes_base: type[nn.Module]

    def forward(self, *args, **kwargs):
        if self.__dict__.get("bayes_probit") and self.bayes_sampling and not self._bayes_active:
            return self._probit_forward(*args, **kwargs)
        saved = _swap_in_samples((self,))
        try:
            return super().forward(*args, **kwargs)
        finally:
            _restore(saved)

    @property
    def draws_noise(self) -> bool:
        """True if a forward now draws random numbers: sampling is on (not within
        :func:`mean_weights`) and the layer is not in the probit mode."""
        return self.bayes_sampling and not self.__dict__.get("bayes_probit", False)

    # ----------------------------------------------------------------- probit
    def output_moments(self, x: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """The mean and variance of this layer's output under its posterior, in closed form.

        For a Linear or convolution (transposed too) with independent Gaussian entries,
        each output entry is sum_i x_i w_i + b, so its mean is the layer's forward with mu
        and its variance the same forward on x^2 with the weights' sigma^2 and the bias'
        sigma^2 (zero at deterministic entries), t included. Only Linear and convolution
        layers (:data:`CONVERTIBLE_TYPES`) have this form.

        Args:
            x: the layer's input, e.g. (N, in_features) or (N, C_in, H, W); ``args`` and
                ``kwargs`` as the layer's forward takes them (``output_size`` of a
                transposed convolution).

        Returns (mean, variance), each of the output's shape, e.g. (N, C_out, H, W).
        """
        if not isinstance(self, CONVERTIBLE_TYPES):
            raise TypeError(
                f"{self._bayes_base.__name__} has no closed-form output variance; only Linear "
                "and convolution layers do"
            )
        if self.is_kronecker:
            return self._kronecker_moments(x)
        base = super()
        mean = base.forward(x, *args, **kwargs)
        swapped = {}
        try:
            for name in PARAM_NAMES:
                mu = self._parameters.get(name)
                if mu is None:
                    continue
                swapped[name] = mu
                self._parameters[name] = (
                    self._dense_variance(name) if name in self.bayes_names else torch.zeros_like(mu)
                )
            variance = base.forward(x * x, *args, **kwargs)
        finally:
            self._parameters.update(swapped)
        return mean, variance

    def _kronecker_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`output_moments` of a Kronecker-factored posterior (a Linear layer, or a
        1x1 convolution: each position is one input row)."""
        mean = super().forward(x)
        qa, qb, var = (self._buffers[k] for k in kronecker.KRONECKER_BUFFERS)
        channels_last = isinstance(self, _ConvNd)
        rows = x.movedim(1, -1) if channels_last else x
        phi = kronecker.augment(rows, "bias" in self.bayes_names)
        variance = kronecker.output_variance(phi, qa, qb, var, self._buffers["bayes_scale"])
        variance = variance.to(mean.dtype)
        if channels_last:
            return mean, variance.view(*mean.movedim(1, -1).shape).movedim(-1, 1)
        return mean, variance.view(mean.shape)

    # ----------------------------------------------------------------- Kronecker
    @property
    def is_kronecker(self) -> bool:
        """True if the layer's posterior is Kronecker-factored (:mod:`bnnconvert.kronecker`)."""
        return "kron_var" in self._buffers

    def set_kronecker_posterior(self, qa: Tensor, qb: Tensor, var: Tensor) -> None:
        """Give this Linear layer (or 1x1 convolution) the Kronecker-factored posterior
        (Q_A (P, P), Q_B (C, C), V (C, P)) of :mod:`bnnconvert.kronecker`; rho becomes the
        marginal sigma (t = 1).

        Raises ValueError unless the layer is a Linear or 1x1 convolution whose every
        weight entry, and every bias entry if it has a bias, is Bayesian.
        """
        self._check_kronecker()
        mu = self._parameters["weight"]
        shapes = {"kron_qa": (self._kron_width(),) * 2, "kron_qb": (mu.shape[0],) * 2,
                  "kron_var": (mu.shape[0], self._kron_width())}  # fmt: skip
        for key, value in zip(kronecker.KRONECKER_BUFFERS, (qa, qb, var)):
            if tuple(value.shape) != shapes[key]:
                raise ValueError(f"{key} must have shape {shapes[key]}, got {tuple(value.shape)}")
            dtype = torch.promote_types(mu.dtype, torch.float32)  # float32 or wider
            self.register_buffer(key, value.detach().to(mu.device, dtype).clone())
        sigma = kronecker.marginal_variance(qa.double(), qb.double(), var.double()).sqrt()
        with torch.no_grad():
            self.bayes_rho("weight").copy_(softplus_inverse(sigma[:, : mu.shape[1]]).reshape(-1))
            if "bias" in self.bayes_names:
                self.bayes_rho("bias").copy_(softplus_inverse(sigma[:, -1]))

    def _check_kronecker(self) -> None:
        problem = None
        if not is_pointwise(self):
            problem = (
                f"it is a {self._bayes_base.__name__}, not a Linear layer or a 1x1 "
                "convolution (stride 1, no padding, one group)"
            )
        elif "weight" not in self.bayes_names or not self.is_dense("weight"):
            problem = "not every entry of its weight is Bayesian"
        elif self.bias is not None and not ("bias" in self.bayes_names and self.is_dense("bias")):
            problem = "not every entry of its bias is Bayesian"
        if problem:
            raise ValueError(
                "a Kronecker-factored posterior needs a Linear layer or 1x1 convolution whose "
                f"every weight and bias entry is Bayesian, but {problem}; convert the layer "
                "whole (e.g. "
                "`bnnconvert convert --last-layer`, bnnconvert.last_layer_masks) or use "
                "covariance='diagonal'"
            )

    def _kron_width(self) -> int:
        """P: in_features, plus 1 if the layer has a Bayesian bias."""
        return self._parameters["weight"].shape[1] + ("bias" in self.bayes_names)

    def kronecker_sample(self) -> tuple[Tensor, ...]:
        """One joint posterior draw of a Kronecker layer, in ``bayes_names`` order: the
        weight (C, in) and, if Bayesian, the bias (C,)."""
        mu = self._parameters["weight"]
        qa, qb, var = (self._buffers[k] for k in kronecker.KRONECKER_BUFFERS)
        delta = kronecker.draw(qa, qb, var, self._buffers["bayes_scale"]).to(mu.dtype)
        weight = mu + delta[:, : mu.shape[1]].view(mu.shape)
        if "bias" not in self.bayes_names:
            return (weight,)
        return weight, self._parameters["bias"] + delta[:, -1]

    def _dense_variance(self, name: str) -> Tensor:
        """(t sigma)^2 of ``name`` at its Bayesian entries, 0 elsewhere, shape of the
        parameter, in its dtype (gradients flow to rho)."""
        mu = self._parameters[name]
        var = self._sigma(name).square().to(mu.dtype)
        if self.is_dense(name):
            return var.view(mu.shape)
        flat = torch.zeros(mu.numel(), dtype=mu.dtype, device=mu.device)
        return flat.scatter(0, self._long_index(name), var).view(mu.shape)

    def _probit_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """mean / sqrt(1 + pi/8 variance) of :meth:`output_moments`: logits whose softmax
        (sigmoid) approximates the posterior's expected softmax (sigmoid) (MacKay, 1992)."""
        mean, variance = self.output_moments(x, *args, **kwargs)
        return mean * torch.rsqrt(1 + (math.pi / 8) * variance)

    # ----------------------------------------------------------------- per tensor
    def bayes_rho(self, name: str) -> Tensor:
        """rho of the selected entries of ``name``, shape (k,)."""
        return self._parameters[f"{name}_rho"]

    def bayes_index(self, name: str) -> Tensor:
        """Flat indices (k,) of the selected entries of ``name`` into ``name.flatten()``."""
        idx = self._buffers[f"{name}_idx"]
        if idx.numel() == 0 and self.bayes_rho(name).numel() > 0:  # dense: every entry
            return torch.arange(self._parameters[name].numel(), device=idx.device)
        return idx

    def is_dense(self, name: str) -> bool:
        """True if every entry of ``name`` is Bayesian (no index is stored)."""
        return self.bayes_rho(name).numel() == self._parameters[name].numel()

    def bayes_mask(self, name: str) -> Tensor:
        """Boolean mask of the Bayesian entries of ``name``, shape of the parameter."""
        mu = self._parameters[name]
        mask = torch.zeros(mu.numel(), dtype=torch.bool, device=mu.device)
        mask[self.bayes_index(name)] = True
        return mask.view(mu.shape)

    def posterior_sigma(self, name: str) -> Tensor:
        """Dense sigma of ``name`` (zero at deterministic entries), shape of the parameter:
        t * softplus(rho), t the layer's scale (``bayes_scale``)."""
        mu = self._parameters[name]
        sigma = torch.zeros(mu.numel(), dtype=mu.dtype, device=mu.device)
        value = self._scaled(F.softplus(self.bayes_rho(name))).detach()
        sigma[self.bayes_index(name)] = value.to(mu.dtype)
        return sigma.view(mu.shape)

    def _scaled(self, sigma: Tensor) -> Tensor:
        """``sigma`` times the layer's scale t (the buffer ``bayes_scale``)."""
        return sigma * self._buffers["bayes_scale"].to(sigma.dtype)

    def sample_noise(self, name: str) -> Tensor:
        """sigma * eps for the selected entries of ``name``, shape (k,), in mu's dtype.

        Draws k standard normals (``randn_like(rho)``); gradients flow to rho.
        """
        rho = self.bayes_rho(name)
        noise = self._sigma(name) * torch.randn_like(rho)
        dtype = self._parameters[name].dtype
        return noise if noise.dtype == dtype else noise.to(dtype)

    def _sigma(self, name: str) -> Tensor:
        """t * softplus(rho) of ``name``, shape (k,); computed once per
        :func:`posterior_cache` block while rho and the scale t are the same tensors,
        unchanged, and the grad/autocast mode is the same (a graph-attached sigma is
        shared by the block's samples)."""
        rho = self.bayes_rho(name)
        scale = self._buffers["bayes_scale"]
        cache = self.__dict__.get("_bayes_cache")
        if (
            cache is None
            or rho.is_inference()
            or torch.jit.is_tracing()
            or torch.compiler.is_compiling()
        ):
            return self._scaled(F.softplus(rho))
        stamp = (
            rho._version,
            scale._version,
            torch.is_grad_enabled(),
            _autocast_state(rho.device.type),
        )
        hit = cache.get(("sigma", name))
        if hit is not None and hit.rho is rho and hit.scale is scale and hit.stamp == stamp:
            return hit.sigma
        sigma = self._scaled(F.softplus(rho))
        cache[("sigma", name)] = _CachedSigma(rho, scale, stamp, sigma)
        return sigma

    def sample_parameter(self, name: str) -> Tensor:
        """One posterior draw of ``name``: mu + sigma * eps on the selected entries.

        Returns a new tensor of the parameter's shape; gradients flow to mu and rho.
        """
        mu = self._parameters[name]
        noise = self.sample_noise(name)
        if self.is_dense(name):
            return mu + noise.view(mu.shape)
        return mu.reshape(-1).scatter_add(0, self._long_index(name), noise).view(mu.shape)

    def _long_index(self, name: str) -> Tensor:
        """The indices of ``name`` as int64 (k,), which scatter needs; converted once per
        :func:`posterior_cache` block (scatter is 2 to 3 times faster than index_add /
        index_copy on a CPU)."""
        idx = self._buffers[f"{name}_idx"]
        cache = self.__dict__.get("_bayes_cache")
        if cache is None or idx.dtype == torch.int64:
            return idx.long()
        hit = cache.get(("idx", name))
        if hit is None or hit.idx is not idx:
            hit = _CachedIndex(idx, idx.long())
            cache[("idx", name)] = hit
        return hit.long

    def perturbs_in_place(self, name: str) -> bool:
        """True if a forward now would add the noise to mu in place (see the module
        docstring): no gradient mode, no tracing or compiling, a contiguous mu and
        k <= INPLACE_MAX_FRACTION * numel."""
        mu = self._parameters[name]
        return (
            not torch.is_grad_enabled()
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
            and mu.is_contiguous()
            and not mu.is_inference()
            and self.bayes_rho(name).numel() <= INPLACE_MAX_FRACTION * mu.numel()
        )

    def _perturb(self, name: str) -> _Perturbed:
        """Add one draw of noise to mu's selected entries in place; returns what
        :meth:`_unperturb` needs: (mu.data flattened (N,), the k original values (k,),
        their int64 indices (k,)). Works on ``mu.data``: autograd's version counter of mu
        is left alone, since mu is bit-identical again afterwards."""
        mu = self._parameters[name]
        idx = self._buffers[f"{name}_idx"]
        cache = self.__dict__.get("_bayes_cache")
        hit = None if cache is None else cache.get(("mu", name))
        if hit is None or hit.mu is not mu or hit.idx is not idx or hit.version != mu._version:
            flat = mu.data.view(-1)
            hit = _CachedMu(mu, idx, mu._version, flat, flat.index_select(0, idx))
            if cache is not None:  # the flat view and the k originals, once per block
                cache[("mu", name)] = hit
        flat, original, idx_long = hit.flat, hit.original, self._long_index(name)
        flat.scatter_(0, idx_long, original + self.sample_noise(name))
        return flat, original, idx_long

    @staticmethod
    def _unperturb(saved: _Perturbed) -> None:
        """Write back the original values saved by :meth:`_perturb`."""
        flat, original, idx_long = saved
        flat.scatter_(0, idx_long, original)

    # ----------------------------------------------------------------- KL
    def kl_loss(self, reduction: str = "mean") -> Tensor:
        """KL(q || prior) over this layer's Bayesian entries, computed in float32 or wider.

        reduction "mean": mean over each tensor's Bayesian entries, summed over tensors
        (bayesian-torch's convention); "sum": the total over all Bayesian entries.
        Returns a scalar tensor.
        """
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        prior = self._buffers["bayes_prior"]
        total = None
        for name in self.bayes_names:
            rho = self.bayes_rho(name)
            dtype = torch.promote_types(rho.dtype, torch.float32)
            mu = self._parameters[name].reshape(-1)
            if not self.is_dense(name):
                mu = mu.index_select(0, self._buffers[f"{name}_idx"])
            sigma = self._scaled(F.softplus(rho.to(dtype)))
            kl = gaussian_kl(mu.to(dtype), sigma, prior[0].to(dtype), prior[1].to(dtype))
            term = kl.mean() if reduction == "mean" else kl.sum()
            total = term if total is None else total + term
        return total

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ):
        """Adopt the selection stored in ``state_dict``: rho and idx are resized to the
        checkpoint's k before loading, so a model converted with other masks loads it.
        Indices of another integer dtype (int64 checkpoints) are checked and converted.
        Checkpoints written before the sigma scale existed load with t = 1. A stored
        Kronecker-factored posterior (``kron_*`` buffers) is adopted too."""
        state_dict.setdefault(prefix + "bayes_scale", torch.ones(()))
        if prefix + "kron_var" in state_dict:
            stored = {k: state_dict.get(prefix + k) for k in kronecker.KRONECKER_BUFFERS}
            expect_kronecker(self, stored)
        for name in self.bayes_names:
            for key, store in ((f"{name}_rho", self._parameters), (f"{name}_idx", self._buffers)):
                saved = state_dict.get(prefix + key)
                if saved is not None and saved.shape != store[key].shape:
                    old = store[key]
                    new = torch.empty(saved.shape, dtype=old.dtype, device=old.device)
                    store[key] = (
                        nn.Parameter(new, old.requires_grad) if key.endswith("_rho") else new
                    )
            key = prefix + f"{name}_idx"
            saved, idx = state_dict.get(key), self._buffers[f"{name}_idx"]
            if saved is not None and saved.dtype != idx.dtype:
                numel = self._parameters[name].numel()
                if saved.is_floating_point() or (
                    saved.numel() and (int(saved.min()) < 0 or int(saved.max()) >= numel)
                ):
                    errors.append(
                        f"{key}: the stored indices are not integers in [0, {numel}); the "
                        "checkpoint is damaged or belongs to another architecture"
                    )
                    continue
                state_dict[key] = saved.to(idx.dtype)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )

    def extra_repr(self) -> str:
        base = super().extra_repr()
        counts = ", ".join(
            f"{n}: {self.bayes_rho(n).numel()}/{self._parameters[n].numel()}"
            for n in self.bayes_names
        ) + (", kronecker" if self.is_kronecker else "")
        return f"{base}, bayes=({counts})" if base else f"bayes=({counts})"


class BayesianOwner:
    """Mixin for modules that read their Bayesian descendants' parameters directly."""

    def forward(self, *args, **kwargs):
        members = tuple(m for m in self.modules() if isinstance(m, BayesianLayer))
        saved = _swap_in_samples(members)
        try:
            return super().forward(*args, **kwargs)
        finally:
            _restore(saved)


def is_pointwise(module: nn.Module) -> bool:
    """True for a Linear layer and for a convolution that maps each position's channels
    by the same matrix (kernel 1, stride 1, no padding, one group, not transposed): the
    layers a Kronecker-factored posterior fits."""
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(module, _ConvNd)
        and not module.transposed
        and all(k == 1 for k in module.kernel_size)
        and all(s == 1 for s in module.stride)
        and module.groups == 1
        and (module.padding == "valid" or module.padding == "same"
             or all(p == 0 for p in module.padding))
    )  # fmt: skip


def expect_kronecker(layer: BayesianLayer, stored: Mapping[str, Tensor | None]) -> None:
    """Register empty ``kron_*`` buffers of the stored shapes on ``layer`` (before a
    state_dict holding a Kronecker-factored posterior is loaded into it)."""
    if any(value is None for value in stored.values()):
        missing = [k for k, v in stored.items() if v is None]
        raise ValueError(f"the stored Kronecker posterior lacks {missing}; the file is damaged")
    layer._check_kronecker()
    device = layer._parameters["weight"].device
    for key, value in stored.items():
        if key not in layer._buffers or layer._buffers[key].shape != value.shape:
            layer.register_buffer(key, torch.empty(value.shape, dtype=value.dtype, device=device))


def gaussian_kl(mu: Tensor, sigma: Tensor, prior_mu: Tensor, prior_sigma: Tensor) -> Tensor:
    """Elementwise KL(N(mu, sigma^2) || N(prior_mu, prior_sigma^2)), shape of mu."""
    return (
        torch.log(prior_sigma / sigma)
        + (sigma.square() + (mu - prior_mu).square()) / (2 * prior_sigma.square())
        - 0.5
    )


@contextmanager
def posterior_cache(model: nn.Module) -> Iterator[None]:
    """Share the per-draw work that does not change between posterior samples.

    Inside the block each Bayesian tensor of ``model`` computes sigma = softplus(rho) once
    (per grad/autocast mode) and, when prediction perturbs mu in place, gathers its k
    original values once; both are recomputed if rho, mu or the indices are replaced
    (``.to()``, ``load_state_dict`` with another k) or changed in place (an optimiser
    step bumps their version counter). The draws are bit-identical to those made outside a
    block. With gradients on, the cached sigma is part of the graph shared by the block's
    samples: run one training step per block (as :func:`bnnconvert.elbo_loss` does).
    Nested blocks reuse the outer cache.
    """
    layers = [m for m in model.modules() if isinstance(m, BayesianLayer)]
    fresh = [m for m in layers if m.__dict__.get("_bayes_cache") is None]
    for m in fresh:
        m._bayes_cache = {}
    try:
        yield
    finally:
        for m in fresh:
            m._bayes_cache = None


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype | None]:
    """Whether autocast is on for ``device_type`` and its dtype (part of a cache key)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return True, torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError):  # a device type without autocast support
        pass
    return False, None


_Saved = list[tuple[BayesianLayer, dict[str, Tensor], dict[str, _Perturbed]]]


def _swap_in_samples(layers: tuple[BayesianLayer, ...]) -> _Saved:
    """Give each layer a fresh posterior sample in place of mu: a new tensor swapped in, or
    mu perturbed in place (see :meth:`BayesianLayer.perturbs_in_place`). Returns what
    :func:`_restore` needs: (layer, swapped-out mus, original values of perturbed mus)."""
    saved: _Saved = []
    try:
        for layer in layers:
            if not layer.bayes_sampling or layer._bayes_active:
                continue
            swapped, perturbed = {}, {}
            saved.append((layer, swapped, perturbed))
            layer.__dict__["_bayes_active"] = True  # not nn.Module.__setattr__: per forward
            if layer.is_kronecker:  # one joint draw of weight and bias
                for name, sample in zip(layer.bayes_names, layer.kronecker_sample()):
                    swapped[name] = layer._parameters[name]
                    layer._parameters[name] = sample
                continue
            for name in layer.bayes_names:  # one draw per tensor, in this order either way
                if layer.perturbs_in_place(name):
                    perturbed[name] = layer._perturb(name)
                else:
                    sample = layer.sample_parameter(name)
                    swapped[name] = layer._parameters[name]
                    layer._parameters[name] = sample
    except BaseException:
        _restore(saved)
        raise
    return saved


def _restore(saved: _Saved) -> None:
    for layer, swapped, perturbed in saved:
        layer._parameters.update(swapped)
        for draw in perturbed.values():
            layer._unperturb(draw)
        layer.__dict__["_bayes_active"] = False


# --------------------------------------------------------------------- class swap
_CLASS_CACHE: dict[tuple[tuple[type, ...], type], type] = {}


def _subclass(mixins: tuple[type, ...], base: type[nn.Module]) -> type:
    """The generated class (*mixins, base), cached; builtin torch.nn bases get a global name
    in this module so that their instances can be pickled. ``base`` is the original class
    (``_bayes_base``), never a generated one."""
    key = (mixins, base)
    cls = _CLASS_CACHE.get(key)
    if cls is None:
        name = "".join(m.__name__ for m in mixins) + base.__name__
        cls = type(name, (*mixins, base), {"__module__": __name__, "_bayes_base": base})
        if base.__module__.startswith("torch.nn") and name not in globals():
            cls.__qualname__ = name
            globals()[name] = cls
        else:
            cls.__qualname__ = f"{name}@{base.__module__}.{base.__qualname__}"
        _CLASS_CACHE[key] = cls
    return cls


def _check_mask(module: nn.Module, name: str, mask: Tensor) -> Tensor:
    param = module._parameters.get(name)
    if param is None:
        raise ValueError(f"{type(module).__name__} has no parameter {name!r} to make Bayesian")
    if isinstance(param, nn.parameter.UninitializedParameter) or not param.is_floating_point():
        raise TypeError(
            f"{type(module).__name__}.{name} is not an initialised floating-point parameter "
            f"({param.dtype}); only those can be Bayesian (run a forward first for lazy layers)"
        )
    if tuple(mask.shape) != tuple(param.shape):
        raise ValueError(
            f"mask for {name!r} has shape {tuple(mask.shape)} but the parameter has shape "
            f"{tuple(param.shape)}; the mask was made for another architecture"
        )
    for suffix, store in (("_rho", module._parameters), ("_idx", module._buffers)):
        if name + suffix in store or name + suffix in module._modules:
            raise ValueError(
                f"{type(module).__name__} already has an attribute {name + suffix!r}, which "
                f"the conversion of {name!r} needs; rename that attribute"
            )
    return mask.to(device=param.device, dtype=torch.bool).reshape(-1)


def make_bayesian(
    module: nn.Module,
    masks: Mapping[str, Tensor],
    *,
    prior_mu: float = 0.0,
    prior_sigma: float = 1.0,
    rho_init: float = -3.0,
    moped_delta: float | None = None,
) -> nn.Module:
    """Turn ``module`` (in place) into a masked reparameterized layer.

    Args:
        module: any module holding the parameters named in ``masks`` (directly, not in a
            child) and reading them as ``self.<name>`` in its forward; not yet Bayesian.
        masks: {parameter name ("weight", "bias", "in_proj_weight", "weight_hh_l0", ...):
            bool tensor of the parameter's shape}; True marks the entries that get a
            learned sigma. Tensors whose mask is all False stay deterministic; if no tensor
            has a selected entry the module is left as it was.
        prior_mu, prior_sigma: the Gaussian prior N(prior_mu, prior_sigma^2).
        rho_init: initial rho of every Bayesian entry (sigma = softplus(rho_init)).
        moped_delta: if given, MOPED initialisation sigma = moped_delta * |mu| instead.

    Returns the same module object.
    """
    if isinstance(module, BayesianLayer):
        raise ValueError(f"{module._bayes_base.__name__} is already Bayesian")
    if prior_sigma <= 0:
        raise ValueError(f"prior_sigma must be positive, got {prior_sigma}")
    if moped_delta is not None and moped_delta <= 0:
        raise ValueError(f"moped_delta must be positive, got {moped_delta}")
    flat = {name: _check_mask(module, name, m) for name, m in masks.items()}
    names = tuple(n for n in module._parameters if n in flat and bool(flat[n].any()))
    if not names:
        return module
    for name in names:
        mu = module._parameters[name]
        sel = flat[name]
        dense = bool(sel.all())
        idx = torch.empty(0, dtype=index_dtype(mu.numel()), device=mu.device)
        if not dense:
            idx = sel.nonzero().squeeze(1).to(idx.dtype)
        mu_sel = mu.detach().reshape(-1) if dense else mu.detach().reshape(-1)[idx]
        rho = _initial_rho(mu_sel, rho_init, moped_delta)
        module.register_parameter(f"{name}_rho", nn.Parameter(rho))
        module.register_buffer(f"{name}_idx", idx)
    device = module._parameters[names[0]].device
    prior = torch.tensor([prior_mu, prior_sigma], dtype=torch.float64)
    module.register_buffer("bayes_prior", prior.to(device))
    module.register_buffer("bayes_scale", torch.ones((), device=device))
    module.bayes_names = names
    module.bayes_sampling = True
    module._bayes_active = False
    if isinstance(module, BayesianOwner):  # already an owner (attach_owners ran first)
        module.__class__ = _subclass((BayesianOwner, BayesianLayer), module._bayes_base)
    else:
        module.__class__ = _subclass((BayesianLayer,), type(module))
    return module


def index_dtype(numel: int) -> torch.dtype:
    """The dtype of the flat indices into a tensor of ``numel`` entries: int32 if it fits."""
    return torch.int32 if numel < 2**31 else torch.int64


def _initial_rho(mu_sel: Tensor, rho_init: float, moped_delta: float | None) -> Tensor:
    """Initial rho for the selected means mu_sel (k,): constant, or MOPED delta * |mu|."""
    if moped_delta is None:
        return torch.full_like(mu_sel, rho_init)
    if not math.isfinite(moped_delta):
        raise ValueError("moped_delta must be finite")
    sigma = (moped_delta * mu_sel.double().abs()).clamp_min(_MIN_SIGMA)
    return softplus_inverse(sigma).to(mu_sel.dtype)


def make_deterministic(module: nn.Module) -> nn.Module:
    """Undo :func:`make_bayesian` (or the owner mixin) in place: mu stays, sigma is dropped."""
    if isinstance(module, BayesianLayer):
        for name in module.bayes_names:
            del module._parameters[f"{name}_rho"]
            del module._buffers[f"{name}_idx"]
        del module._buffers["bayes_prior"]
        del module._buffers["bayes_scale"]
        for key in kronecker.KRONECKER_BUFFERS:
            module._buffers.pop(key, None)
        for attr in ("bayes_names", "bayes_sampling", "bayes_probit", "_bayes_active",
                     "_bayes_cache"):  # fmt: skip
            module.__dict__.pop(attr, None)
    if isinstance(module, (BayesianLayer, BayesianOwner)):
        module.__class__ = module._bayes_base
    return module


def attach_owners(model: nn.Module) -> None:
    """Make every DIRECT_READERS module with Bayesian descendants a sampling owner (a
    Bayesian ``nn.MultiheadAttention`` with a Bayesian out_proj is both: its own tensors
    and its child's are drawn when it is called)."""
    for module in model.modules():
        if not isinstance(module, DIRECT_READERS) or isinstance(module, BayesianOwner):
            continue
        if not any(isinstance(m, BayesianLayer) for m in module.modules() if m is not module):
            continue
        if isinstance(module, BayesianLayer):
            module.__class__ = _subclass((BayesianOwner, BayesianLayer), module._bayes_base)
        else:
            module.__class__ = _subclass((BayesianOwner,), type(module))


@contextmanager
def mean_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every Bayesian layer uses its mean mu (no noise).

    The converted model then reproduces the original model's outputs.
    """
    layers = [layer for _, layer in bayesian_layers(model)]
    previous = [layer.bayes_sampling for layer in layers]
    for layer in layers:
        layer.bayes_sampling = False
    try:
        yield model
    finally:
        for layer, flag in zip(layers, previous):
            layer.bayes_sampling = flag


def set_sigma_scale(model: nn.Module, scale: float) -> None:
    """Multiply every posterior sigma of ``model`` by ``scale`` >= 0 from now on: the value
    replaces the previous scale of every Bayesian layer (0 samples the means, 1 the sigma
    of rho). Saved and loaded with the model (the buffer ``bayes_scale``)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a number, got {scale!r}")
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
    for _, layer in bayesian_layers(model):
        layer._buffers["bayes_scale"].fill_(scale)


def sigma_scale(model: nn.Module) -> float | None:
    """The sigma scale t of ``model``'s Bayesian layers, or None if it has none (a
    ValueError if the layers disagree, e.g. after a per-layer ablation)."""
    values = {float(layer._buffers["bayes_scale"]) for _, layer in bayesian_layers(model)}
    if len(values) > 1:
        raise ValueError(f"the Bayesian layers have different sigma scales: {sorted(values)}")
    return values.pop() if values else None


def bayesian_masks(model: nn.Module) -> dict[str, Tensor]:
    """{parameter name: bool mask (the parameter's shape) of its Bayesian entries} of a
    converted model, for every tensor with a Bayesian entry."""
    return {
        f"{name}.{t}" if name else t: layer.bayes_mask(t)
        for name, layer in bayesian_layers(model)
        for t in layer.bayes_names
    }


def bayesian_layers(model: nn.Module) -> Iterator[tuple[str, BayesianLayer]]:
    """(name, layer) for every converted layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, BayesianLayer):
            yield name, module
