"""The one-call orchestrator: checkpoint in, partial Bayesian network out.

:func:`convert_checkpoint` chains the steps of the method that need no training: load a
user checkpoint (:mod:`bnnconvert.serialization`), score it
(:func:`~bnnconvert.compute_saliency`), convert (:func:`~bnnconvert.convert`) and save.
It sits above the step modules so that it can grow to call later steps too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ._utils import check_output_path
from .convert import convert
from .losses import LossFn
from .saliency import DATA_CRITERIA, Saliency, check_r_bayes, compute_saliency
from .serialization import load_checkpoint, remember_arch, save

__all__ = ["convert_checkpoint"]


def convert_checkpoint(
    checkpoint: str | os.PathLike | nn.Module,
    data: Iterable | None = None,
    r_bayes: float = 0.01,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    criterion: str = "grad2",
    saliency: Saliency | str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    trust_pickle: bool = False,
    loss_fn: LossFn | None = None,
    num_batches: int | None = None,
    device: str | torch.device | None = None,
    **convert_kwargs: Any,
) -> nn.Module:
    """Checkpoint in, partial Bayesian network out: load, score, select, convert, save.

    Args:
        checkpoint: a file :func:`~bnnconvert.serialization.load_checkpoint` reads, or a
            model.
        data: (input, target) batches for the saliency pass (criteria "grad2", "fisher").
        r_bayes: fraction of entries made Bayesian, in (0, 1].
        arch, arch_kwargs, trust_pickle: see
            :func:`~bnnconvert.serialization.load_checkpoint`.
        criterion: saliency criterion when ``saliency`` is None.
        saliency: a ready :class:`~bnnconvert.Saliency` or the path of a saved one.
        output: if given, the converted model is written there with
            :func:`~bnnconvert.serialization.save`.
        loss_fn, num_batches, device: passed to :func:`~bnnconvert.compute_saliency`.
        **convert_kwargs: passed to :func:`~bnnconvert.convert` (prior_sigma, rho_init,
            moped_delta, scope, ...).

    Returns the converted model (it remembers its architecture spec).
    """
    check_r_bayes(r_bayes)
    if output is not None:
        check_output_path(output)
    if isinstance(checkpoint, nn.Module):
        model = checkpoint
        remember_arch(model, arch, arch_kwargs)
    else:
        model = load_checkpoint(checkpoint, arch, arch_kwargs, trust_pickle=trust_pickle)
    if saliency is None:
        if criterion in DATA_CRITERIA and data is None:
            raise ValueError(
                f"criterion {criterion!r} needs data=... for its gradient pass; pass data, a "
                "saved saliency, or criterion='magnitude' / 'random'"
            )
        saliency = compute_saliency(
            model, data, loss_fn, criterion=criterion, num_batches=num_batches, device=device
        )
    pbnn = convert(model, saliency, r_bayes, **convert_kwargs)
    if output is not None:
        save(pbnn, output)
    return pbnn
