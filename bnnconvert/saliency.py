"""Step 2 of the method: score every weight entry, then select the top r_bayes fraction.

Criteria (a small hierarchy of scoring functions, one few-line function each):

- ``"grad2"``: the paper's score, (sum over batches of the gradient)^2: the gradient is
  accumulated over the whole pass and squared once, as the reference code does.
- ``"fisher"``: sum over batches of the squared per-batch gradient (empirical Fisher
  diagonal at batch level).
- ``"variance"``: the posterior variance 1 / (H_ii + lambda) of a diagonal Laplace
  approximation over every entry (Daxberger et al., 2021, "Bayesian deep learning via
  subnetwork inference"): H the Monte Carlo GGN diagonal of the NLL summed over the data
  (:func:`bnnconvert.curvature.diagonal_ggn`, BatchNorm in eval mode), lambda fitted by the
  marginal likelihood. It ranks the entries the data constrain least first.
- ``"magnitude"``: |w| (data-free ablation, laplace-torch's largest-magnitude subnetwork).
- ``"random"``: uniform random scores from a seeded generator (data-free ablation).

Scores cover the parameters that ``include`` / ``exclude`` select (see
:func:`bnnconvert.layers.convertible_parameters`): by default every weight and bias of
Linear, convolution, attention, recurrent and embedding layers; normalisation layers and
other raw parameters are opt-in. The selection is stored in ``Saliency.meta``, and
:func:`bnnconvert.convert` converts the same parameters by default.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._utils import BatchFormat, as_batch_format, atomic_torch_save, load_payload
from .curvature import diagonal_ggn, fit_prior_precision, laplace_sigma, likelihood_of_task
from .layers import check_selection, require_parameters
from .losses import LossFn, data_task, default_loss

__all__ = ["CRITERIA", "Saliency", "check_r_bayes", "compute_saliency"]

log = logging.getLogger(__name__)

DATA_CRITERIA = ("grad2", "fisher", "variance")
FREE_CRITERIA = ("magnitude", "random")
CRITERIA = DATA_CRITERIA + FREE_CRITERIA
FORMAT = "bnnconvert.saliency"
FORMAT_VERSION = 1


# ------------------------------------------------------------------------ Saliency
@dataclass
class Saliency:
    """Per-entry saliency scores of a model's convertible parameters.

    Attributes:
        scores: {parameter name: float32 CPU tensor of the parameter's shape}, in the
            model's parameter order.
        criterion: the criterion that produced the scores.
        meta: plain-typed facts about the pass (batches, samples, seed, ...).
    """

    scores: dict[str, Tensor]
    criterion: str
    meta: dict = field(default_factory=dict)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """{parameter name: shape}: the architecture fingerprint of the scored model."""
        return {n: tuple(s.shape) for n, s in self.scores.items()}

    @property
    def num_entries(self) -> int:
        """N, the number of scored entries."""
        return sum(s.numel() for s in self.scores.values())

    def select(self, r_bayes: float, scope: str = "global") -> dict[str, Tensor]:
        """Boolean masks of the entries to make Bayesian.

        Args:
            r_bayes: fraction in (0, 1]. scope "global" selects exactly
                k = round(r_bayes * N) entries over all tensors; "layer" selects
                round(r_bayes * n_t) entries of each tensor t.
            scope: "global" (the paper) or "layer".

        Ties at the threshold are broken by position (parameter order, then flat index),
        so exactly k entries are selected and the result is deterministic.

        Returns {parameter name: bool tensor of the parameter's shape}.
        """
        check_r_bayes(r_bayes)
        if scope == "global":
            flat = torch.cat([s.reshape(-1) for s in self.scores.values()])
            chosen = _top_k_mask(flat, _count(r_bayes, flat.numel()))
            return _split(chosen, self.scores)
        if scope == "layer":
            return {
                n: _top_k_mask(s.reshape(-1), _count(r_bayes, s.numel(), strict=False)).view(
                    s.shape
                )
                for n, s in self.scores.items()
            }
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")

    def save(self, path: str | os.PathLike) -> None:
        """Write the scores atomically; the file loads with torch.load(weights_only=True)."""
        payload = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "criterion": self.criterion,
            "meta": dict(self.meta),
            "scores": dict(self.scores),
        }
        atomic_torch_save(payload, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Saliency:
        """Read a file written by :meth:`save` (no code is unpickled)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"saliency file not found: {path}")
        wrong = (
            f"{path} is not a saliency file written by bnnconvert; create one with "
            "bnnconvert.compute_saliency(...).save(path)"
        )
        payload = load_payload(path, FORMAT, FORMAT_VERSION, wrong)
        return cls(payload["scores"], payload["criterion"], payload.get("meta", {}))


def check_r_bayes(r_bayes: float) -> None:
    """Raise ValueError unless 0 < r_bayes <= 1."""
    if isinstance(r_bayes, bool) or not isinstance(r_bayes, (int, float)):
        raise TypeError(f"r_bayes must be a number in (0, 1], got {type(r_bayes).__name__}")
    if not (0.0 < r_bayes <= 1.0) or math.isnan(r_bayes):
        raise ValueError(f"r_bayes must be in (0, 1] (a fraction: 0.01 means 1 %), got {r_bayes}")


def _count(r_bayes: float, n: int, strict: bool = True) -> int:
    k = round(r_bayes * n)
    if k == 0 and strict:
        raise ValueError(
            f"r_bayes={r_bayes} selects round({r_bayes} x {n}) = 0 entries; "
            f"use r_bayes >= {0.5 / n:.2g}"
        )
    return k


def _top_k_mask(flat: Tensor, k: int) -> Tensor:
    """Bool mask (N,) with exactly k True: the k largest scores, ties by lowest index."""
    n = flat.numel()
    mask = torch.zeros(n, dtype=torch.bool)
    if k >= n:
        mask.fill_(True)
        return mask
    if k == 0:
        return mask
    # numpy's introselect finds the k-th largest score in O(N), faster than torch.topk
    threshold = float(np.partition(flat.numpy(), n - k)[n - k])
    mask = flat > threshold
    missing = k - int(torch.count_nonzero(mask))
    if missing > 0:
        ties = (flat == threshold).nonzero().squeeze(1)[:missing]
        mask[ties] = True
    return mask


def _split(flat_mask: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out, start = {}, 0
    for name, ref in like.items():
        out[name] = flat_mask[start : start + ref.numel()].view(ref.shape)
        start += ref.numel()
    return out


# ------------------------------------------------------------------------ the pass
def compute_saliency(
    model: nn.Module,
    data: Iterable | None,
    loss_fn: LossFn | None = None,
    *,
    criterion: str = "grad2",
    num_batches: int | None = None,
    device: str | torch.device | None = None,
    seed: int | None = None,
    batch_format: BatchFormat | None = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> Saliency:
    """Score every entry of the model's convertible parameters.

    Args:
        model: the trained deterministic model. It is left exactly as found:
            parameters, buffers (BatchNorm running statistics), ``.grad`` fields,
            ``requires_grad`` flags and train/eval mode.
        data: iterable of (input, target) batches; may be None for "magnitude"/"random".
        loss_fn: (output, target) -> scalar; default :func:`default_loss`.
        criterion: one of ``CRITERIA`` (see the module docstring).
        num_batches: stop after this many batches (default: the whole iterable).
        device: where to run the pass (default: the model's device). The model is moved
            there for the pass and moved back afterwards.
        seed: seed of the "random" criterion (default: drawn from torch's global RNG).
        batch_format: how to read mapping batches and structured outputs
            (:class:`bnnconvert.BatchFormat`); ``loss_fn`` gets the logits it reads.
        include: the parameter kinds and/or name patterns scored (see
            :func:`bnnconvert.layers.convertible_parameters`); default every weight and
            bias of Linear, convolution, attention, recurrent and embedding layers. E.g.
            ``include=("linear", "other")`` adds a custom module's raw parameters.
        exclude: kinds or patterns removed from that selection.

    Returns a :class:`Saliency` with float32 CPU scores; its ``meta`` records ``include``
    and ``exclude``.

    The gradient pass runs with BatchNorm in train mode (batch statistics, as in the
    reference implementation); running statistics are restored afterwards.

    Under torch.distributed (an initialised process group), each rank passes over its own
    shard and the accumulated gradients (squared gradients for "fisher") are all-reduced
    before "grad2" squares them: every rank gets the scores of one pass over all shards.
    Only rank 0 writes the result (``Saliency.save`` does nothing on other ranks).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    include, exclude = check_selection(include, exclude)
    params = require_parameters(model, include, exclude, "score")
    selection = {"include": list(include), "exclude": list(exclude)}
    if criterion in FREE_CRITERIA:
        scores = _data_free_scores(params, criterion, seed)
        meta = {"seed": seed} if criterion == "random" else {}
        return Saliency(scores, criterion, {**meta, **selection})
    if data is None:
        raise ValueError(f"criterion {criterion!r} needs data: an iterable of (input, target)")
    fmt = as_batch_format(batch_format)
    task = data_task(data)  # read from the loader itself, before any slicing hides it
    data = _first_batches(data, num_batches)
    if criterion == "variance":
        sal = _variance_scores(model, params, data, task, device, fmt)
        sal.meta.update(selection)
        return sal
    grads, meta = _gradient_pass(
        model, params, data, loss_fn or default_loss, criterion, device, fmt
    )
    return Saliency(grads, criterion, {**meta, **selection})


def _first_batches(data: Iterable, num_batches: int | None) -> Iterable:
    """The first ``num_batches`` batches of ``data`` (all of them for None). The result
    is a plain iterator: read anything the loader declares (``data_task``) before."""
    return data if num_batches is None else itertools.islice(data, num_batches)


def _variance_scores(
    model: nn.Module,
    params: Mapping[str, Tensor],
    data: Iterable,
    task: str | None,
    device,
    fmt: BatchFormat,
) -> Saliency:
    """Diagonal Laplace posterior variances of every entry of ``params`` (see the module
    docstring); ``task`` (:data:`bnnconvert.losses.TASKS` or None: categorical) picks the
    likelihood."""
    curvature = diagonal_ggn(
        model,
        data,
        likelihood=likelihood_of_task(task),
        names=list(params),
        device=device,
        batch_format=fmt,
    )
    flat_h = torch.cat([h.reshape(-1) for h in curvature.diagonal.values()])
    flat_w = torch.cat([params[n].detach().reshape(-1) for n in curvature.diagonal])
    lam = fit_prior_precision(flat_h, flat_w)
    scores = {n: laplace_sigma(h, lam).square().cpu() for n, h in curvature.diagonal.items()}
    meta = {"num_samples": curvature.num_data, "prior_precision": lam}
    return Saliency(scores, "variance", meta)


def _data_free_scores(params: Mapping[str, Tensor], criterion: str, seed: int | None) -> dict:
    if criterion == "magnitude":
        return {n: p.detach().abs().float().cpu() for n, p in params.items()}
    gen = torch.Generator()
    gen.manual_seed(int(torch.randint(2**62, ()).item()) if seed is None else seed)
    return {n: torch.rand(p.shape, generator=gen) for n, p in params.items()}


def _gradient_pass(model, params, data, loss_fn, criterion, device, fmt):
    """Accumulate gradient statistics over the batches; restore the model afterwards."""
    names, tensors = list(params), list(params.values())
    home = None
    if device is not None:
        home = _home_device(model)
        model.to(device)
    state = _snapshot(model, home)
    acc = [torch.zeros_like(t, dtype=torch.float32) for t in tensors]
    batches = samples = 0
    try:
        model.train()
        for p in tensors:
            p.requires_grad_(True)
        for batch in data:
            x, y = fmt.split(batch, tensors[0].device, need_target=True)
            loss = loss_fn(fmt.forward(model, x), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"the loss of batch {batches} is {loss.item()}; check that batch's "
                    "inputs and targets for NaN/inf and that the model is trained"
                )
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            for a, g in zip(acc, grads):
                if g is not None:
                    a.add_(g.square() if criterion == "fisher" else g)
            batches += 1
            samples += len(y)
    finally:
        _restore_snapshot(model, state)
    batches, samples = _all_reduce(acc, batches, samples)
    if batches == 0:
        raise ValueError("the data yielded no batch; pass a non-empty iterable of (input, target)")
    bad = [name for name, a in zip(names, acc) if not torch.isfinite(a).all()]
    if bad:
        raise FloatingPointError(
            f"non-finite gradient for parameter(s) {', '.join(map(repr, bad[:5]))}"
            f"{' ...' if len(bad) > 5 else ''} in the saliency pass; check the data for "
            "NaN/inf and the loss for log(0), or retrain the model"
        )
    scores = {n: (a.square() if criterion == "grad2" else a).cpu() for n, a in zip(names, acc)}
    return scores, {"num_batches": batches, "num_samples": samples}


def _all_reduce(acc: list[Tensor], batches: int, samples: int) -> tuple[int, int]:
    """Under torch.distributed, sum the accumulated statistics of every rank (before the
    grad2 squaring), so that each rank's shard counts as in one pass over all the data."""
    if not (dist.is_available() and dist.is_initialized()):
        return batches, samples
    for a in acc:
        dist.all_reduce(a)
    counts = torch.tensor([batches, samples], dtype=torch.float64, device=acc[0].device)
    dist.all_reduce(counts)
    return int(counts[0]), int(counts[1])


def _snapshot(model: nn.Module, device: torch.device | None) -> dict:
    """What the pass may change: mode flags, buffers, requires_grad, and the device to
    return to (None: the model was not moved). ``.grad`` is never touched."""
    return {
        "modes": {m: m.training for m in model.modules()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "requires_grad": {p: p.requires_grad for p in model.parameters()},
        "device": device,
    }


def _home_device(model: nn.Module) -> torch.device:
    devices = {t.device for t in list(model.parameters()) + list(model.buffers())}
    if len(devices) != 1:
        raise ValueError(
            f"the model spans several devices {sorted(map(str, devices))}; leave device=None "
            "to run the saliency pass where the model is"
        )
    return devices.pop()


def _restore_snapshot(model: nn.Module, state: dict) -> None:
    if state["device"] is not None:
        model.to(state["device"])
    with torch.no_grad():
        for name, buf in model.named_buffers():
            saved = state["buffers"][name]
            buf.copy_(saved.to(buf.device))
    for m, training in state["modes"].items():
        m.training = training
    for p, flag in state["requires_grad"].items():
        p.requires_grad_(flag)
