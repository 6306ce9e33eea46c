"""Monte Carlo prediction with uncertainty, and the deterministic forward at mu.

``predict`` draws S posterior samples of a model's output (through
:func:`bnnconvert.sampling.mc_outputs`), turns them into probabilities and summarises them
in a :class:`Prediction`: the mean prediction and its uncertainty decomposition

    entropy           H[ E_s p_s ]          total uncertainty (the paper's "entropy", EoE)
    expected_entropy  E_s H[ p_s ]          aleatoric part
    mutual_info       H[ E_s p_s ] - E_s H[ p_s ]   epistemic part (>= 0)

in nats. "softmax" outputs are categorical over the class dimension 1 of (N, C, ...):
classification (N, C) or per-pixel segmentation (N, C, H, W[, D]). "sigmoid" outputs are
independent Bernoulli variables, one per output entry (multi-label (N, L), or binary
segmentation (N, 1, H, W[, D])): the entropies are per entry. Entropies are computed from
log-probabilities (log_softmax, logsigmoid, log-mean-exp over samples), so probabilities of
exactly 0 or 1 give 0 * log 0 = 0, never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from tqdm.auto import tqdm

from ._utils import (
    BatchFormat,
    Inputs,
    as_batch_format,
    call_model,
    check_positive_int,
    chunk_inputs,
    eval_mode,
    inputs_device,
    model_device,
    move_inputs,
    split_batch,
)
from .convert import INFO_ATTR
from .layers import bayesian_layers, mean_weights
from .sampling import mc_outputs

__all__ = [
    "AMP_DTYPES",
    "DEFAULT_SAMPLES",
    "PREDICTIVES",
    "BatchFormat",
    "Prediction",
    "amp_autocast",
    "eval_mode",
    "mean_weights",
    "predict",
    "predict_batches",
    "prediction_samples",
    "predictive_of",
    "samples_of",
    "set_predictive",
    "split_batch",
    "stream_predictions",
    "temperature_of",
    "uncertainty_terms",
]

Activation = Literal["softmax", "sigmoid", "none"]
ACTIVATIONS = ("softmax", "sigmoid", "none")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""Mixed precision names: "bf16" (CPU and recent GPUs), "fp16" (GPUs; train with a
GradScaler). "none" or None: full precision."""


def amp_autocast(device: torch.device | str | None, amp: str | None) -> AbstractContextManager[Any]:
    """``torch.autocast`` on ``device``'s type in the precision ``amp`` names ("bf16",
    "fp16"), or a null context for None / "none".

    Under it, convolutions and matrix products run in half precision; the posterior
    samples (mu + sigma * eps), sigma and the KL stay in the parameters' float32.
    """
    if amp is None or amp == "none":
        return nullcontext()
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)} or 'none', got {amp!r}")
    device_type = torch.device(device).type if device is not None else "cpu"
    return torch.autocast(device_type, dtype=AMP_DTYPES[amp])


# --------------------------------------------------------------------- entropies
def categorical_entropy(log_p: Tensor, dim: int) -> Tensor:
    """-sum_c p_c log p_c over ``dim`` from log-probabilities (p = 0 contributes 0).

    ``log_p`` may hold -inf (p = 0). Returns ``log_p`` without ``dim``, in nats.
    """
    p = log_p.exp()
    return -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(dim)


def uncertainty_terms(log_samples: Tensor, class_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Entropy decomposition of S categorical predictions given as log-probabilities.

    Args:
        log_samples: (S, ...) log-probabilities of S samples, normalised over ``class_dim``
            (an index into ``log_samples``' dimensions, not 0); -inf allowed.
        class_dim: the class dimension of ``log_samples``.

    Returns (entropy, expected_entropy, mutual_info), each of shape ``log_samples.shape``
    without dims 0 and ``class_dim``:

        entropy          = H[mean_s p_s], with log mean_s p_s = logsumexp_s(log p_s) - log S
        expected_entropy = mean_s H[p_s]
        mutual_info      = max(entropy - expected_entropy, 0), and exactly 0 wherever the
                           S samples are identical (so one sample gives 0, never NaN).
    """
    class_dim = class_dim % log_samples.ndim
    if class_dim == 0:
        raise ValueError("class_dim must not be the sample dimension 0")
    n = log_samples.shape[0]
    expected = categorical_entropy(log_samples, class_dim).mean(0)
    log_mean = torch.logsumexp(log_samples, dim=0) - math.log(n)
    total = categorical_entropy(log_mean, class_dim - 1)
    identical = (log_samples.amax(0) == log_samples.amin(0)).all(class_dim - 1)
    mutual = torch.where(identical, torch.zeros_like(total), (total - expected).clamp_min(0))
    return total, expected, mutual


def _float(t: Tensor) -> Tensor:
    """``t`` in float32 or wider (half-precision outputs are summarised in float32)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def summarise_outputs(outputs: Tensor, activation: str) -> dict[str, Tensor | None]:
    """Probabilities and uncertainty of S raw outputs (S, N, ...) of one batch."""
    outputs = _float(outputs)
    terms: tuple[Tensor | None, ...] = (None, None, None)
    if activation == "softmax":
        if outputs.ndim < 3:
            raise ValueError(
                f"activation='softmax' needs outputs of shape (N, C, ...) with a class "
                f"dimension 1, got {tuple(outputs.shape[1:])}; use activation='sigmoid' for "
                "one logit per item"
            )
        log_p = outputs.log_softmax(dim=2)
        per_sample = log_p.exp()
        terms = uncertainty_terms(log_p, class_dim=2)
    elif activation == "sigmoid":
        log_p = torch.stack([F.logsigmoid(outputs), F.logsigmoid(-outputs)], dim=-1)
        per_sample = torch.sigmoid(outputs)
        terms = uncertainty_terms(log_p, class_dim=-1)
    else:
        per_sample = outputs
    entropy, expected, mutual = terms
    return {
        "probs": per_sample.mean(0),
        "variance": per_sample.var(0, correction=0),
        "entropy": entropy,
        "expected_entropy": expected,
        "mutual_info": mutual,
        "samples": per_sample,
    }


# --------------------------------------------------------------------- Prediction
class Prediction:
    """The Monte Carlo prediction of a model on N inputs, with its uncertainty.

    Shapes, for model outputs of shape (N, C, *spatial) (spatial empty for classification):

    - ``probs`` (N, C, *spatial): mean over samples of the per-sample probabilities.
    - ``samples`` (S, N, C, *spatial): the per-sample probabilities, or None when
      ``predict(..., keep_samples=False)``.
    - ``variance`` (N, C, *spatial): variance over samples of the probabilities
      (population variance, 0 for a single sample).
    - ``entropy``, ``expected_entropy``, ``mutual_info``: (N, *spatial) for "softmax"
      (categorical over C); (N, C, *spatial) for "sigmoid" (Bernoulli per entry). In nats.
      Not defined for activation "none" (accessing them raises ValueError).
    - ``targets``: the targets of (input, target) batches, concatenated, or None.

    With activation "none", ``probs`` and ``samples`` hold the raw outputs.
    """

    _TENSORS = (
        "probs",
        "variance",
        "_entropy",
        "_expected_entropy",
        "_mutual_info",
        "samples",
        "targets",
    )

    def __init__(
        self,
        probs: Tensor,
        variance: Tensor,
        *,
        activation: Activation = "softmax",
        entropy: Tensor | None = None,
        expected_entropy: Tensor | None = None,
        mutual_info: Tensor | None = None,
        samples: Tensor | None = None,
        targets: Tensor | None = None,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.probs = probs
        self.variance = variance
        self.activation = activation
        self._entropy = entropy
        self._expected_entropy = expected_entropy
        self._mutual_info = mutual_info
        self.samples = samples
        self.targets = targets

    def _uncertainty(self, name: str) -> Tensor:
        value = getattr(self, f"_{name}")
        if value is None:
            raise ValueError(
                f"{name} is not defined for activation={self.activation!r} (raw outputs); "
                "predict with activation='softmax' or 'sigmoid'"
            )
        return value

    @property
    def entropy(self) -> Tensor:
        """Entropy of the expected prediction H[mean_s p_s]: total uncertainty (EoE)."""
        return self._uncertainty("entropy")

    @property
    def expected_entropy(self) -> Tensor:
        """Expected entropy mean_s H[p_s]: the aleatoric part."""
        return self._uncertainty("expected_entropy")

    @property
    def mutual_info(self) -> Tensor:
        """Mutual information entropy - expected_entropy (>= 0): the epistemic part."""
        return self._uncertainty("mutual_info")

    @property
    def num_samples(self) -> int | None:
        """S, or None when the samples were not kept."""
        return None if self.samples is None else self.samples.shape[0]

    def __len__(self) -> int:
        return self.probs.shape[0]

    def __repr__(self) -> str:
        return (
            f"Prediction(activation={self.activation!r}, probs={tuple(self.probs.shape)}, "
            f"samples={None if self.samples is None else tuple(self.samples.shape)}, "
            f"targets={None if self.targets is None else tuple(self.targets.shape)})"
        )

    def _map(self, fn) -> Prediction:
        new = object.__new__(Prediction)
        new.__dict__.update(self.__dict__)
        for name in self._TENSORS:
            value = getattr(self, name)
            setattr(new, name, None if value is None else fn(value))
        return new

    def to(self, device: torch.device | str) -> Prediction:
        """A copy with every tensor on ``device``."""
        return self._map(lambda t: t.to(device))

    def cpu(self) -> Prediction:
        """A copy with every tensor on the CPU."""
        return self._map(Tensor.cpu)

    @staticmethod
    def cat(predictions: Iterable[Prediction]) -> Prediction:
        """Concatenate predictions of consecutive batches along N (samples along dim 1).

        ``samples`` (``targets``) are kept only if every part has them.
        """
        parts = list(predictions)
        if not parts:
            raise ValueError("no predictions to concatenate (was the data empty?)")
        if len(parts) == 1:
            return parts[0]
        activations = {p.activation for p in parts}
        if len(activations) > 1:
            raise ValueError(f"cannot concatenate predictions of activations {activations}")
        new = object.__new__(Prediction)
        new.__dict__.update(parts[0].__dict__)
        for name in Prediction._TENSORS:
            values = [getattr(p, name) for p in parts]
            dim = 1 if name == "samples" else 0
            joined = None if any(v is None for v in values) else torch.cat(values, dim=dim)
            setattr(new, name, joined)
        return new


# --------------------------------------------------------------------- predict
def tensor_batches(data: Tensor | Mapping | Iterable, batch_size: int | None) -> Iterable:
    """Batches of ``data``: a tensor (N, ...) or a mapping of tensors {key: (N, ...)} split
    into ``batch_size`` rows (one batch if None), or an iterable of batches (a DataLoader)
    as it is (then batch_size must be None)."""
    if isinstance(data, (Tensor, Mapping)):
        if batch_size is None:
            return [data]
        check_positive_int(batch_size=batch_size)
        return chunk_inputs(data, batch_size)
    if batch_size is not None:
        raise ValueError("batch_size applies to tensor input; a DataLoader sets its own")
    return data


def temperature_of(model: nn.Module) -> float:
    """The temperature T of a calibrated model's predictive (softmax/sigmoid of
    outputs / T), stored in ``model.bnnconvert_info["temperature"]`` by
    :func:`bnnconvert.calibrate_posterior`; 1 if none."""
    info = getattr(model, INFO_ATTR, None)
    return float(info.get("temperature", 1.0)) if isinstance(info, dict) else 1.0


DEFAULT_SAMPLES = 5
"""S of :func:`predict` for a model that carries no calibrated S."""


def samples_of(model: nn.Module, default: int = DEFAULT_SAMPLES) -> int:
    """The S a calibrated model was calibrated with (``model.bnnconvert_info["samples"]``,
    stored by :func:`bnnconvert.calibrate_posterior`: its t and T were chosen for that
    many draws), else ``default``; 1 for a model with the probit predictive
    (:func:`set_predictive`)."""
    if predictive_of(model) == "probit":
        return 1
    info = getattr(model, INFO_ATTR, None)
    value = info.get("samples") if isinstance(info, dict) else None
    return int(value) if value is not None else default


def prediction_samples(model: nn.Module, samples: int | None = None) -> int:
    """S for a prediction of ``model``: 1 for a model without Bayesian layers, or whose
    Bayesian layers all use the probit predictive (its samples would be identical), else
    ``samples``, or when None the S it was calibrated with (:func:`samples_of`)."""
    if not any(layer.draws_noise for _, layer in bayesian_layers(model)):
        return 1
    return samples_of(model) if samples is None else samples


PREDICTIVES = ("sample", "probit")
"""How a converted model predicts: "sample" (Monte Carlo: S forwards, each with its own
weight draw) or "probit" (a Bayesian output layer returns the closed-form probit logits
mean / sqrt(1 + pi/8 variance) of its Gaussian outputs; one forward, no random number)."""


def predictive_of(model: nn.Module) -> str:
    """The predictive of a converted model (:data:`PREDICTIVES`), stored in
    ``model.bnnconvert_info["predictive"]`` by :func:`set_predictive`; "sample" if none."""
    info = getattr(model, INFO_ATTR, None)
    return str(info.get("predictive", "sample")) if isinstance(info, dict) else "sample"


def set_predictive(
    model: nn.Module,
    predictive: str,
    inputs: Inputs | None = None,
    *,
    batch_format: BatchFormat | None = None,
) -> None:
    """Make a converted model predict by Monte Carlo ("sample") or in closed form ("probit").

    "probit" (MacKay, 1992; the predictive of laplace-torch's last-layer Laplace): the
    model's only Bayesian layer, a Linear or convolution that produces the model's output
    logits, returns mean / sqrt(1 + pi/8 variance) of its Gaussian outputs
    (:meth:`bnnconvert.layers.BayesianLayer.output_moments`, exact for a diagonal
    posterior); the softmax (sigmoid) of those logits approximates the posterior's expected
    softmax (sigmoid), per item and class (or pixel), without sampling. A prediction is then
    one forward (S = 1: the mutual information is 0, the entropy is that of the probit
    predictive). The sigma scale t multiplies the standard deviations as before; the
    temperature T divides the probit logits.

    Args:
        model: a model returned by :func:`bnnconvert.convert`.
        predictive: one of :data:`PREDICTIVES`.
        inputs: "probit": one input batch (N, ...) (or keyword inputs), run once at the
            means to check that the Bayesian layer's output is the model's output (a
            view or reshape of it counts; an operation after it does not).
        batch_format: reads the logits of structured outputs (:class:`BatchFormat`).

    The choice is stored in ``model.bnnconvert_info["predictive"]``, saved and loaded
    with the model. Raises ValueError when the model does not fit the probit.
    """
    if predictive not in PREDICTIVES:
        raise ValueError(f"predictive must be one of {PREDICTIVES}, got {predictive!r}")
    layers = [layer for _, layer in bayesian_layers(model)]
    if not layers:
        raise ValueError("the model has no Bayesian entry; convert it with bnnconvert.convert()")
    if not isinstance(getattr(model, INFO_ATTR, None), dict):
        raise ValueError(
            f"{type(model).__name__} carries no {INFO_ATTR} to store the predictive in: pass "
            "the model bnnconvert.convert() returned (for a wrapper such as "
            "DistributedDataParallel, its .module)"
        )
    if predictive == "probit":
        if inputs is None:
            raise ValueError(
                "predictive='probit' needs inputs=... (one input batch) to check that the "
                "Bayesian layer produces the model's output"
            )
        _check_probit(model, layers, inputs, as_batch_format(batch_format))
    apply_predictive(model, predictive)


def apply_predictive(model: nn.Module, predictive: str) -> None:
    """Set the mode of every Bayesian layer and the stored name, without the checks of
    :func:`set_predictive` (for a model loaded with its stored predictive)."""
    for _, layer in bayesian_layers(model):
        layer.__dict__["bayes_probit"] = predictive == "probit"
    getattr(model, INFO_ATTR)["predictive"] = predictive


def _check_probit(model: nn.Module, layers: list, inputs: Inputs, fmt: BatchFormat) -> None:
    """ValueError unless ``layers`` is one Linear/convolution, called once, whose output
    is (a view of) the model's output."""
    names = [name for name, _ in bayesian_layers(model)]
    layer = layers[0]
    if len(layers) > 1 or not isinstance(layer, (nn.Linear, _ConvNd)):
        kinds = ", ".join(f"{n or 'model'} ({layer._bayes_base.__name__})" for n in names[:4])
        raise ValueError(
            "predictive='probit' needs exactly one Bayesian layer, a Linear or convolution "
            f"producing the model's output (convert with bnnconvert.last_layer_masks); this "
            f"model has {len(layers)}: {kinds}{', ...' if len(names) > 4 else ''}"
        )
    seen: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with eval_mode(model), torch.no_grad(), mean_weights(model):
            out = fmt.output(call_model(model, move_inputs(inputs, model_device(model))))
    finally:
        handle.remove()
    if len(seen) != 1 or not _same_storage(seen[0], out):
        where = "is called more than once" if len(seen) > 1 else "does not produce it"
        raise ValueError(
            f"predictive='probit' needs the Bayesian layer {names[0]!r} to produce the model's "
            f"output logits, but it {where} (an operation after it, e.g. an activation or a "
            "scaling, would not commute with the probit); use predictive='sample'"
        )


def _same_storage(a: object, b: object) -> bool:
    """True if tensors ``a`` and ``b`` hold the same data (one a view of the other)."""
    return (
        isinstance(a, Tensor)
        and isinstance(b, Tensor)
        and a.numel() == b.numel()
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() == b.storage_offset()
    )


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def predict_batches(
    model: nn.Module,
    data: Tensor | Iterable,
    samples: int = 5,
    *,
    activation: Activation = "softmax",
    batch_size: int | None = None,
    keep_samples: bool = True,
    device: torch.device | str | None = None,
    output_device: torch.device | str | None = None,
    progress: bool | None = None,
    amp: str | None = None,
    batch_format: BatchFormat | None = None,
) -> Iterator[Prediction]:
    """Yield one :class:`Prediction` per batch (with its ``targets`` when batches are pairs).

    The streaming form of :func:`predict` (same arguments): feed each batch to a
    :class:`bnnconvert.metrics.SegmentationMeter` to evaluate a whole test set without
    holding its probabilities in memory. Eval mode and no_grad apply only while a batch is
    computed; the model's modes are restored before each yield.
    """
    check_positive_int(samples=samples)
    amp_autocast(None, amp)  # checks the name now, not at the first batch
    fmt = as_batch_format(batch_format)
    temperature = temperature_of(model) if activation != "none" else 1.0

    def forward(x: Inputs) -> Tensor:
        with eval_mode(model), amp_autocast(inputs_device(x), amp):
            outputs = mc_outputs(model, x, samples, batch_format=fmt)
        return outputs if temperature == 1.0 else outputs / temperature

    return stream_predictions(
        forward,
        data,
        activation=activation,
        batch_size=batch_size,
        keep_samples=keep_samples,
        device=model_device(model) if device is None else torch.device(device),
        output_device=output_device,
        progress=progress,
        batch_format=fmt,
    )


def stream_predictions(
    forward: Callable[[Inputs], Tensor],
    data: Tensor | Mapping | Iterable,
    *,
    activation: Activation = "softmax",
    batch_size: int | None = None,
    keep_samples: bool = True,
    device: torch.device | str | None = None,
    output_device: torch.device | str | None = None,
    progress: bool | None = None,
    batch_format: BatchFormat | None = None,
) -> Iterator[Prediction]:
    """The streaming loop behind :func:`predict_batches` and
    :meth:`bnnconvert.methods.Method.predict`: one :class:`Prediction` per batch.

    Args:
        forward: input batch x (N, ...), or keyword inputs {name: (N, ...)}, -> raw
            outputs (S, N, C, ...) of S forwards; called under ``torch.no_grad()``.
        data, activation, batch_size, keep_samples, output_device, progress,
            batch_format: see :func:`predict` (``batch_format`` reads the batches here;
            ``forward`` reads the outputs).
        device: where each input batch is sent (None: where it is).
    """
    _check_activation(activation)
    fmt = as_batch_format(batch_format)
    batches = tensor_batches(data, batch_size)
    single = isinstance(data, (Tensor, Mapping)) and batch_size is None
    disable = (not progress) if progress is not None else (True if single else None)
    batches = tqdm(batches, desc="predict", unit="batch", disable=disable)
    return _stream(forward, batches, activation, keep_samples, device, output_device, fmt)


def _stream(
    forward: Callable[[Inputs], Tensor],
    batches: Iterable,
    activation: str,
    keep_samples: bool,
    device: torch.device | str | None,
    output_device: torch.device | str | None,
    fmt: BatchFormat,
) -> Iterator[Prediction]:
    for batch in batches:
        x, target = fmt.split(batch)
        if device is not None:
            x = move_inputs(x, device)
        with torch.no_grad():
            outputs = forward(x)
        summary = summarise_outputs(outputs, activation)
        if not keep_samples:
            summary["samples"] = None
        if output_device is not None:
            summary = {k: None if v is None else v.to(output_device) for k, v in summary.items()}
        if target is not None:
            target = target.to(summary["probs"].device)
        yield Prediction(activation=activation, targets=target, **summary)


def predict(
    model: nn.Module,
    x: Tensor | Iterable,
    samples: int | None = None,
    *,
    activation: Activation = "softmax",
    batch_size: int | None = None,
    keep_samples: bool = True,
    device: torch.device | str | None = None,
    output_device: torch.device | str | None = None,
    progress: bool | None = None,
    amp: str | None = None,
    batch_format: BatchFormat | None = None,
) -> Prediction:
    """Monte Carlo prediction of ``model`` on ``x`` with ``samples`` posterior samples.

    Runs under ``torch.no_grad()`` in eval mode (BatchNorm uses its running statistics;
    Bayesian layers keep sampling), then restores every module's training flag. A model
    calibrated by :func:`bnnconvert.calibrate_posterior` predicts with its stored
    temperature T (probabilities of outputs / T; ``activation="none"`` returns the raw
    outputs). A deterministic model gives S identical samples (mutual information 0), and
    so does a model with the closed-form probit predictive (:func:`set_predictive`), whose
    default S is 1: one forward, the entropy that of the probit predictive. Each
    forward draws one weight sample for its whole batch: the items of a batch share their
    S draws, so smaller batches give more independent draws (for the same FLOPs). The
    result is reproducible under ``torch.manual_seed`` (note that iterating a DataLoader
    draws its base seed from the global RNG unless it was given its own ``generator``).

    Args:
        model: any nn.Module mapping a batch (N, ...) to outputs (N, C, ...) (or to a
            structure holding them: ``batch_format``).
        x: an input tensor (N, ...), or an iterable of batches (a DataLoader): tensors, or
            (input, target, ...) sequences whose targets are collected in
            ``Prediction.targets``, or mappings read by ``batch_format`` (one mapping of
            tensors is one batch). Batches are concatenated along N.
        samples: S, the number of forward passes (posterior samples). None: the S the
            model was calibrated with (:func:`samples_of`; its t and T were chosen for
            it), else 5.
        activation: "softmax" (multi-class, class dim 1), "sigmoid" (multi-label or binary,
            one Bernoulli per output entry), or "none" (raw outputs; no entropies).
        batch_size: split a tensor ``x`` into batches of this size (memory: each batch
            holds S x batch outputs).
        keep_samples: keep the per-sample probabilities (S, N, C, ...) in ``.samples``;
            False keeps only the summaries (for a segmentation test set).
        device: where batches are sent; default the device of the model's parameters.
        output_device: where the results are gathered (e.g. "cpu" for a GPU model on a
            large test set); default where they were computed.
        progress: show a tqdm bar over batches; None shows one for iterables on a terminal.
        amp: "bf16" or "fp16" runs the forward passes under ``torch.autocast`` on the
            batches' device (:func:`amp_autocast`); the probabilities and uncertainty are
            computed in float32 from the half-precision outputs. None: full precision.
        batch_format: how to read mapping batches (``input_key``, ``target_key``) and
            structured outputs (``output_fn``), a :class:`BatchFormat`; None: tensor and
            (input, target) batches, outputs read as the tensor, ``.logits``,
            ``["logits"]`` or a tuple's first item.

    Returns a :class:`Prediction`; see its docstring for the shapes.
    """
    if samples is None:
        samples = samples_of(model)
    parts = predict_batches(
        model,
        x,
        samples,
        activation=activation,
        batch_size=batch_size,
        keep_samples=keep_samples,
        device=device,
        output_device=output_device,
        progress=progress,
        amp=amp,
        batch_format=batch_format,
    )
    return Prediction.cat(parts)
