"""Layer Ensembles (Kushibar et al., 2022): one output head per stage of one network."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._utils import (
    BatchFormat,
    Inputs,
    as_batch_format,
    call_arguments,
    call_model,
    move_inputs,
    split_batch,
)
from ..metrics import aula
from ..models import UNet
from ..predict import eval_mode
from ..training import first_batch
from .base import FitRun, Method, StackedBatch, stacked_format, stacked_loss

__all__ = ["LayerEnsemble", "LayerEnsembleNet", "default_stages"]

_INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def default_stages(model: nn.Module) -> list[str]:
    """Stage names for :class:`bnnconvert.models.UNet` (every ``encoder`` and ``decoder``
    block) and torchvision ResNets (``layer1`` .. ``layer4``); other models need
    ``stages=[module names]``."""
    if isinstance(model, UNet):
        return [f"encoder.{i}" for i in range(len(model.encoder))] + [
            f"decoder.{i}" for i in range(len(model.decoder))
        ]
    import torchvision.models  # here, not at import time: it takes seconds

    if isinstance(model, torchvision.models.ResNet):
        return ["layer1", "layer2", "layer3", "layer4"]
    raise ValueError(
        f"no default stages for {type(model).__name__}: pass stages=[names of the modules "
        "whose outputs get a head], e.g. its blocks in model.named_modules()"
    )


class SegmentationHead(nn.Module):
    """A 3x3 convolution to the classes, upsampled (bilinear in 2D) to the output size."""

    def __init__(self, channels: int, classes: int, dims: int):
        super().__init__()
        self.conv = _CONV[dims](channels, classes, 3, padding=1)
        self.mode = _INTERPOLATION[dims]

    def forward(self, features: Tensor, size: Sequence[int]) -> Tensor:
        out = self.conv(features)
        if tuple(out.shape[2:]) == tuple(size):
            return out
        return F.interpolate(out, size=tuple(size), mode=self.mode, align_corners=False)


class ClassificationHead(nn.Module):
    """Global average pooling over the spatial dimensions, then a linear layer."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.linear = nn.Linear(channels, classes)

    def forward(self, features: Tensor, size: Sequence[int]) -> Tensor:
        pooled = features.flatten(2).mean(-1) if features.dim() > 2 else features
        return self.linear(pooled)


class LayerEnsembleNet(nn.Module):
    """The model plus one head per stage; ``forward`` returns every head's output.

    Output: (K, N, C, *spatial), the heads in stage order, then (``include_output``) the
    model's own output (its logits read by ``batch_format``) as the deepest member. Stage
    outputs are captured with forward hooks registered only during the call, so the model
    itself is left unchanged. ``forward`` takes the model's own arguments.
    """

    def __init__(
        self,
        model: nn.Module,
        stages: Sequence[str],
        heads: Sequence[nn.Module],
        include_output: bool = True,
        batch_format: BatchFormat | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.stages = list(stages)
        self.heads = nn.ModuleList(heads)
        self.include_output = include_output
        self.batch_format = as_batch_format(batch_format)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        output, features = _run_with_hooks(self.model, self.stages, args, kwargs, self.batch_format)
        size = output.shape[2:]
        outs = [head(features[s], size) for s, head in zip(self.stages, self.heads)]
        if self.include_output:
            outs.append(output)
        return torch.stack(outs)


def _run_with_hooks(
    model: nn.Module,
    stages: Sequence[str],
    args: tuple,
    kwargs: Mapping[str, Any],
    fmt: BatchFormat,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The model's logits on ``(*args, **kwargs)`` and {stage name: its output tensor}."""
    modules = dict(model.named_modules())
    features: dict[str, Tensor] = {}

    def store(name, module, args, out):
        features[name] = out

    handles = [modules[s].register_forward_hook(partial(store, s)) for s in stages]
    try:
        output = fmt.output(model(*args, **kwargs))
    finally:
        for h in handles:
            h.remove()
    return output, features


class LayerEnsemble(Method):
    """Layer Ensembles: a head after each stage, trained jointly, averaged in prediction.

    Args:
        model, task, name: see :class:`~bnnconvert.methods.Method` (``samples`` is
            ignored: one forward gives every head).
        stages: names of the modules whose outputs get a head (default
            :func:`default_stages`). Segmentation heads: a 3x3 convolution to the classes
            and bilinear (trilinear in 3D) upsampling to the output size; classification
            heads: global average pooling and a linear layer.
        skip: heads left out of the prediction, from the first (shallowest) on; default
            ``len(stages) // 2`` (Kushibar et al. choose it on validation data). The
            model's own output is always kept.
        include_output: the model's own output is the last member (default True).
        example_input: an input batch to build the heads now; otherwise the first
            training batch builds them at :meth:`fit`.

    Training: ``epochs`` epochs of the whole network and heads with the unweighted sum of
    the task losses of every member. Prediction: the members from ``skip`` on; their
    outputs are ``Prediction.samples``. :meth:`aula` gives the image-level uncertainty.
    """

    name = "layer_ensemble"

    def __init__(
        self,
        model: nn.Module,
        *,
        stages: Sequence[str] | None = None,
        skip: int | None = None,
        include_output: bool = True,
        example_input: Tensor | None = None,
        task: str | None = None,
        samples: int = 1,
        name: str | None = None,
    ) -> None:
        super().__init__(model, task=task, samples=samples, name=name)
        self.stages = list(default_stages(model) if stages is None else stages)
        missing = set(self.stages) - {n for n, _ in model.named_modules()}
        if missing:
            raise ValueError(f"no module named {sorted(missing)[0]!r} in the model")
        self.skip = len(self.stages) // 2 if skip is None else skip
        members = len(self.stages) + include_output
        if not 0 <= self.skip < members:
            raise ValueError(f"skip must be in [0, {members}), got {skip}")
        self.include_output = include_output
        if example_input is not None:
            if task is None:
                raise ValueError("pass task= with example_input: it decides the kind of head")
            self.initial = self._build(self.initial, example_input)
            self.model = self._fresh()

    @property
    def members(self) -> int:
        """K, the members in total (heads + the model's output)."""
        return len(self.stages) + self.include_output

    def _build(self, model: nn.Module, x: Inputs) -> LayerEnsembleNet:
        """Attach heads sized from one eval-mode forward of ``x`` (N, ...) (or keyword
        inputs)."""
        fmt = as_batch_format(self.batch_format)
        with eval_mode(model), torch.no_grad():
            output, features = _run_with_hooks(model, self.stages, *call_arguments(x), fmt)
        classes, dims = output.shape[1], output.dim() - 2
        heads = [
            SegmentationHead(features[s].shape[1], classes, dims)
            if self.task == "segmentation"
            else ClassificationHead(features[s].shape[1], classes)
            for s in self.stages
        ]
        net = LayerEnsembleNet(model, self.stages, heads, self.include_output, fmt)
        p = next(model.parameters())
        return net.to(device=p.device, dtype=p.dtype)

    def train_model(self, run: FitRun) -> None:
        """Train network and heads for ``run.epochs`` epochs on the sum of the member
        losses."""
        fmt = as_batch_format(self.batch_format)
        if not isinstance(self.initial, LayerEnsembleNet):
            x, _ = split_batch(first_batch(run.train_data), self.device, batch_format=fmt)
            if run.seed is not None:
                torch.manual_seed(run.seed)
            self.initial = self._build(self.initial, x)
        self.initial.batch_format = fmt  # heads built by example_input: the fit's format
        self.model = self._fresh()
        nll = self._loss(run.options.get("class_weights"))
        loss = stacked_loss(nll, self.members, "sum")
        self._train(StackedBatch(self.model), run, loss_fn=loss, batch_format=stacked_format(fmt))

    def outputs(self, x: Inputs, samples: int) -> Tensor:
        """The members from ``skip`` on: (K - skip, N, C, *spatial)."""
        if not isinstance(self.model, LayerEnsembleNet):
            raise RuntimeError("no heads yet: call fit() or pass example_input")
        with eval_mode(self.model):
            return call_model(self.model, x)[self.skip :]

    def aula(self, x: Inputs) -> Tensor:
        """AULA per image (N,) of the members' argmax masks (from ``skip`` on, at least 2):
        the area under the Dice agreement curve of consecutive members
        (:func:`bnnconvert.metrics.aula`). High = the heads agree = low uncertainty."""
        if self.task != "segmentation":
            raise ValueError(f"AULA needs segmentation masks; the task is {self.task!r}")
        with torch.no_grad():
            out = self.outputs(move_inputs(x, self.device), 1)
        masks = out.argmax(2).cpu()  # (K', N, *spatial)
        classes = out.shape[2]
        return torch.tensor([aula(masks[:, n], num_classes=classes) for n in range(masks.shape[1])])
