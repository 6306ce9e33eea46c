"""Deep ensembles (Lakshminarayanan et al., 2017): M members trained from different seeds."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._utils import Inputs, check_positive_int
from .base import FitRun, Method, model_flops, model_outputs, reseed_data

__all__ = ["Ensemble", "reset_parameters"]

INITS = ("reset", "weights")


class Ensemble(Method):
    """M members, each trained for the whole budget; prediction averages the members.

    Args:
        model, task, name: see :class:`~bnnconvert.methods.Method`.
        members: M (the paper's baseline: 5).
        init: "reset" (default): member i is re-initialised with torch's global RNG
            seeded with ``seed + i``, by calling ``reset_parameters()`` on every module
            that has one (Linear, Conv, BatchNorm, ...; a module holding parameters of its
            own without that method keeps the given values, with a warning), then trained
            from scratch; "weights": every member starts from the given weights and
            differs only by its data order and seed (a cheap variant when fine-tuning).
            Either way member i trains with ``seed + i`` and reseeded data order
            (:func:`~bnnconvert.methods.base.reseed_data`).

    ``fit(epochs=E)`` trains EACH member for E epochs: M x E epochs in all.
    ``predict`` returns one output per member (``Prediction.samples`` is (M, N, C, ...)).
    """

    name = "ensemble"

    def __init__(
        self,
        model: nn.Module,
        *,
        members: int = 5,
        init: str = "reset",
        task: str | None = None,
        samples: int = 5,
        name: str | None = None,
    ) -> None:
        super().__init__(model, task=task, samples=samples, name=name)
        check_positive_int(members=members)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.members = members
        self.init = init
        self.member_models = nn.ModuleList()

    def train_model(self, run: FitRun) -> None:
        """Train the M members one after the other (``val_data`` is not used)."""
        base = 0 if run.seed is None else run.seed
        trained = []
        for i in range(self.members):
            member = self._fresh()
            if self.init == "reset":
                torch.manual_seed(base + i)
                reset_parameters(member)
            reseed_data(run.train_data, base + i)
            self._train(member, run, seed=base + i)
            trained.append(member)
        self.member_models = nn.ModuleList(trained)
        self.model = trained[0]

    def outputs(self, x: Inputs, samples: int) -> Tensor:
        if not len(self.member_models):
            raise RuntimeError("the ensemble has no members yet: call fit() first")
        fmt = self.batch_format
        return torch.cat([model_outputs(m, x, 1, batch_format=fmt) for m in self.member_models])

    def num_parameters(self) -> int:
        return self.members * sum(p.numel() for p in self.model.parameters())

    def flops(self, inputs: Tensor | Sequence[Tensor]) -> dict[str, int]:
        """inference: M forwards; train_step: one step of one member; train_run: every
        member's steps."""
        one = model_flops(
            self.model,
            inputs,
            inference_samples=1,
            train_samples=1,
            steps=0,
            batch_format=self.batch_format,
        )
        return {
            "forward": one["forward"],
            "inference": self.members * one["inference"],
            "train_step": one["train_step"],
            "train_run": self.train_steps * one["train_step"],
        }


def reset_parameters(model: nn.Module) -> list[str]:
    """Re-initialise ``model`` in place: ``reset_parameters()`` of every module that has it.

    Returns the names of modules that hold parameters of their own but have no
    ``reset_parameters`` (they keep their values; a warning names them).
    """
    kept = []
    for name, module in model.named_modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
        elif any(True for _ in module.parameters(recurse=False)):
            kept.append(name or "(root)")
    if kept:
        warnings.warn(
            f"ensemble members keep the given values of {', '.join(kept)}: these modules have "
            "parameters but no reset_parameters(); use init='weights' or add one",
            stacklevel=2,
        )
    return kept
