"""Step 3, conversion: the module walker.

``convert`` walks any nn.Module (nested, Sequential, ModuleDict, custom containers) and
turns each module holding selected entries into a masked reparameterized layer in place
(see :mod:`bnnconvert.layers`). Because layers are converted in place, no parent container
needs rewiring, whatever its type. Which parameters are scored and may be converted is the
``include`` / ``exclude`` choice of parameter kinds and name patterns
(:data:`bnnconvert.layers.PARAMETER_KINDS`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .layers import (
    PARAMETER_KINDS,
    BayesianLayer,
    attach_owners,
    bayesian_layers,
    check_selection,
    convertible_parameters,
    is_convertible,
    make_bayesian,
    make_deterministic,
    parameter_kind,
    require_parameters,
)
from .saliency import FREE_CRITERIA, Saliency, check_r_bayes, compute_saliency

__all__ = [
    "BayesSummary",
    "bayes_summary",
    "convert",
    "last_convertible_layers",
    "last_layer_masks",
    "layer_masks",
    "to_deterministic",
]

INFO_ATTR = "bnnconvert_info"
"""Attribute of a converted model's root holding the conversion settings (a plain dict)."""


def convert(
    model: nn.Module,
    saliency: Saliency | str | os.PathLike | Mapping[str, Tensor],
    r_bayes: float | None = None,
    *,
    prior_mu: float = 0.0,
    prior_sigma: float = 1.0,
    rho_init: float = -3.0,
    moped_delta: float | None = None,
    scope: str = "global",
    inplace: bool = False,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> nn.Module:
    """Turn a trained deterministic model into a sparse (partial) Bayesian network.

    Args:
        model: the trained model; its weights become the posterior means mu.
        saliency: a :class:`Saliency`, the path of a saved one, a data-free criterion
            name ("random", "magnitude"), or ready-made masks
            {parameter name: bool tensor} (then ``r_bayes`` must be None).
        r_bayes: fraction of scored entries made Bayesian, in (0, 1]; 1.0 gives a fully
            Bayesian network.
        prior_mu, prior_sigma: the prior N(prior_mu, prior_sigma^2) of the KL term.
        rho_init: initial rho of the Bayesian entries (sigma = softplus(rho_init)).
        moped_delta: MOPED initialisation sigma = moped_delta * |mu| instead of rho_init
            (advisable for r_bayes >= 5 %: a constant sigma of softplus(-3) = 0.049 is
            larger than most trained weights).
        scope: "global" (the paper's global top-k) or "layer" (same fraction per layer).
        inplace: convert ``model`` itself instead of a deep copy.
        include: which parameters are scored and may be converted: parameter kinds
            ("linear", "conv", "attention", "recurrent", "embedding", "norm", "other"; see
            :data:`bnnconvert.layers.PARAMETER_KINDS`) and/or glob patterns of state_dict
            names ("*.scale"). Default: the kinds a :class:`Saliency` was computed with
            (``compute_saliency(..., include=...)``), else
            :data:`~bnnconvert.layers.DEFAULT_INCLUDE` (every weight and bias of Linear,
            convolution, attention, recurrent and embedding layers). With ready-made
            masks the default accepts any floating-point parameter the masks name.
        exclude: kinds or patterns removed from ``include``'s selection.

    Returns the converted model. Layers without a selected entry are left untouched.
    ``model.bnnconvert_info`` records the settings, ``include`` and ``exclude`` among them.
    """
    masks, info = _resolve_masks(model, saliency, r_bayes, scope, include, exclude)
    if not inplace:
        model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    for layer_name, layer_masks in _group_by_layer(masks).items():
        make_bayesian(
            modules[layer_name],
            layer_masks,
            prior_mu=prior_mu,
            prior_sigma=prior_sigma,
            rho_init=rho_init,
            moped_delta=moped_delta,
        )
    attach_owners(model)
    info.update(
        prior_mu=prior_mu,
        prior_sigma=prior_sigma,
        rho_init=rho_init,
        moped_delta=moped_delta,
        scope=scope,
    )
    setattr(model, INFO_ATTR, info)
    return model


def last_convertible_layers(model: nn.Module, n: int) -> list[str]:
    """Names of the last ``n`` convertible layers (Linear/Conv/ConvTranspose) of ``model``
    in registration order (``named_modules()``), which is the forward order of
    sequential networks, torchvision's ResNets and :class:`bnnconvert.models.UNet`."""
    names = [name for name, m in model.named_modules() if is_convertible(m)]
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(names):
        raise ValueError(
            f"n must be an integer in 1..{len(names)} (the model's convertible layers), got {n!r}"
        )
    return names[-n:]


def layer_masks(model: nn.Module, layers: Sequence[str]) -> dict[str, Tensor]:
    """All-True masks of the weight and bias of each named layer (for :func:`convert`)."""
    params = convertible_parameters(model)
    masks = {
        name: torch.ones_like(p, dtype=torch.bool)
        for name, p in params.items()
        if name.rpartition(".")[0] in layers
    }
    found = {name.rpartition(".")[0] for name in masks}
    missing = [layer for layer in layers if layer not in found]
    if missing:
        raise ValueError(
            f"no convertible layer named {missing[0]!r}; give names of Linear/Conv layers "
            "as in model.named_modules()"
        )
    return masks


def last_layer_masks(model: nn.Module) -> dict[str, Tensor]:
    """Masks selecting every weight and bias of the model's last convertible layer (see
    :func:`last_convertible_layers`: a classifier's head, a segmentation network's final
    convolution): ``convert(model, last_layer_masks(model))`` makes that layer fully
    Bayesian and leaves every other layer as it was."""
    if not any(is_convertible(m) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no Linear/Conv/ConvTranspose layer to select")
    return layer_masks(model, last_convertible_layers(model, 1))


def _resolve_masks(model, saliency, r_bayes, scope, include, exclude) -> tuple[dict, dict]:
    """The masks to apply and the info to record: (masks, {criterion, r_bayes, include,
    exclude})."""
    if any(isinstance(m, BayesianLayer) for m in model.modules()):
        raise ValueError("the model is already converted; call to_deterministic() first")
    if isinstance(saliency, Mapping):
        return _ready_made_masks(model, saliency, r_bayes, include, exclude)
    check_r_bayes(r_bayes)
    free = isinstance(saliency, str) and saliency in FREE_CRITERIA
    if isinstance(saliency, (str, os.PathLike)) and not free:
        saliency = Saliency.load(saliency)
    if isinstance(saliency, Saliency):  # by default, what the saliency scored
        include = saliency.meta.get("include") if include is None else include
        exclude = saliency.meta.get("exclude") if exclude is None else exclude
    include, exclude = check_selection(include, exclude)
    params = require_parameters(model, include, exclude, "convert")
    if free:
        saliency = compute_saliency(
            model, None, criterion=saliency, include=include, exclude=exclude
        )
    if not isinstance(saliency, Saliency):
        raise TypeError(
            "saliency must be a Saliency, a path to a saved one, 'random', 'magnitude' or a "
            f"dict of masks; got {type(saliency).__name__}"
        )
    _check_names(saliency.scores, convertible_parameters(model, PARAMETER_KINDS), subset=True)
    missing = [n for n in params if n not in saliency.scores]
    if missing:
        raise ValueError(
            f"{len(missing)} parameter(s) selected by include={list(include)}, "
            f"exclude={list(exclude)} were not scored (e.g. {missing[0]!r}): the saliency "
            "was computed on another architecture or with other include/exclude; recompute "
            "it on this model with the same include= and exclude="
        )
    if set(saliency.scores) != set(params):  # scored more than asked for: narrow
        scores = {n: s for n, s in saliency.scores.items() if n in params}
        saliency = Saliency(scores, saliency.criterion, dict(saliency.meta))
    masks = saliency.select(r_bayes, scope)
    info = {"criterion": saliency.criterion, "r_bayes": float(r_bayes)}
    return masks, {**info, "include": list(include), "exclude": list(exclude)}


def _ready_made_masks(model, masks, r_bayes, include, exclude) -> tuple[dict, dict]:
    """Ready-made masks: any floating-point parameter unless include/exclude narrow them."""
    if r_bayes is not None:
        raise ValueError("pass r_bayes=None with ready-made masks: they already select")
    given = include is not None or exclude is not None
    include, exclude = check_selection(include, exclude)
    params = convertible_parameters(model, include, exclude)
    if given:
        _check_names(masks, params, subset=True, include=include, exclude=exclude)
    else:  # the masks are the selection
        everything = convertible_parameters(model, PARAMETER_KINDS)
        _check_names(masks, everything, subset=True)
        params = {**params, **{n: everything[n] for n in masks}}
    info = {"criterion": "masks", "r_bayes": _fraction(masks, params)}
    return dict(masks), {**info, "include": list(include), "exclude": list(exclude)}


def _check_names(
    tensors: Mapping[str, Tensor],
    params: Mapping[str, Tensor],
    subset: bool,
    include=None,
    exclude=None,
):
    """Raise a clear error when the masks or scores were made for another architecture (or
    name parameters outside ``include``/``exclude``)."""
    unknown = [n for n in tensors if n not in params]
    missing = [] if subset else [n for n in params if n not in tensors]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"{len(unknown)} not in the model (e.g. {unknown[0]!r})")
        if missing:
            parts.append(f"{len(missing)} model parameters not scored (e.g. {missing[0]!r})")
        hint = ""
        if include is not None and unknown:
            hint = f" (or outside include={list(include)}, exclude={list(exclude)}: widen include)"
        raise ValueError(
            "the saliency/masks were computed on another architecture: "
            + "; ".join(parts)
            + hint
            + ". Recompute the saliency on this model."
        )
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(params[name].shape):
            raise ValueError(
                f"the saliency/masks were computed on another architecture: {name!r} has "
                f"shape {tuple(t.shape)} there but {tuple(params[name].shape)} in the model. "
                "Recompute the saliency on this model."
            )


def _fraction(masks: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> float:
    total = sum(p.numel() for p in params.values())
    return sum(int(torch.count_nonzero(m)) for m in masks.values()) / total


def _group_by_layer(masks: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    grouped: dict[str, dict[str, Tensor]] = {}
    for full_name, mask in masks.items():
        layer, _, tensor = full_name.rpartition(".")
        grouped.setdefault(layer, {})[tensor] = mask
    return grouped


def to_deterministic(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The original architecture with mu as weights (sigma dropped).

    The result's state_dict has exactly the keys of the model before conversion.
    """
    if not inplace:
        model = copy.deepcopy(model)
    for module in model.modules():
        make_deterministic(module)
    model.__dict__.pop(INFO_ATTR, None)
    return model


# ------------------------------------------------------------------------ summary
@dataclass
class LayerRow:
    """One module: its class (``kind``), the kinds of its listed parameters (``params``,
    e.g. "attention" or "linear"), their entries and how many are Bayesian."""

    name: str
    kind: str
    entries: int
    bayesian: int
    params: str = ""


@dataclass
class BayesSummary:
    """Per-layer entries and Bayesian entries of a (converted) model; prints as a table."""

    rows: list[LayerRow]

    @property
    def entries(self) -> int:
        return sum(r.entries for r in self.rows)

    @property
    def bayesian(self) -> int:
        return sum(r.bayesian for r in self.rows)

    def __str__(self) -> str:
        width = max([len("layer"), *(len(r.name) for r in self.rows)])
        lines = [
            f"{'layer':<{width}}  {'type':<16} {'parameters':<12} {'entries':>11} "
            f"{'bayesian':>10} {'%':>7}"
        ]
        for r in [*self.rows, LayerRow("total", "", self.entries, self.bayesian)]:
            pct = 100.0 * r.bayesian / r.entries if r.entries else 0.0
            lines.append(
                f"{r.name:<{width}}  {r.kind:<16} {r.params:<12} {r.entries:>11,} "
                f"{r.bayesian:>10,} {pct:>6.2f}%"
            )
        return "\n".join(lines)


def bayes_summary(
    model: nn.Module,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> BayesSummary:
    """Per module holding scored parameters: their entries and how many are Bayesian.

    Args:
        model: a converted or plain model.
        include, exclude: the parameters listed (as in :func:`convert`); default: those the
            model was converted with (``bnnconvert_info``), else
            :data:`~bnnconvert.layers.DEFAULT_INCLUDE`. Bayesian tensors are always listed.
    """
    if include is None and exclude is None:
        info = getattr(model, INFO_ATTR, None) or {}
        include, exclude = info.get("include"), info.get("exclude")
    listed = convertible_parameters(model, include, exclude)
    rows = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        bayes = module.bayes_names if isinstance(module, BayesianLayer) else ()
        tensors = [
            n
            for n, p in module._parameters.items()
            if p is not None and (f"{prefix}{n}" in listed or n in bayes)
        ]
        if not tensors:
            continue
        entries = sum(module._parameters[n].numel() for n in tensors)
        k = sum(module.bayes_rho(n).numel() for n in bayes)
        params = "+".join(dict.fromkeys(parameter_kind(module, n) for n in tensors))
        base = getattr(module, "_bayes_base", type(module))
        rows.append(LayerRow(name or "(root)", base.__name__, entries, k, params))
    return BayesSummary(rows)


def num_bayesian(model: nn.Module) -> int:
    """k: the number of Bayesian entries of a converted model."""
    return sum(m.bayes_rho(n).numel() for _, m in bayesian_layers(model) for n in m.bayes_names)
