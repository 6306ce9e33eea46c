"""Calibration on validation data: the sigma scale t and the predictive's temperature T.

:func:`calibrate_posterior` chooses one scale t that multiplies every sigma of a converted
model (t = 0: the model at its means) and a temperature T of the Monte Carlo predictive
mean_s softmax(f_s / T), by the validation NLL (:func:`predictive_nll`). t lives in every
Bayesian layer (``bayes_scale``, :func:`bnnconvert.layers.set_sigma_scale`), T in
``model.bnnconvert_info["temperature"]`` (applied by :func:`bnnconvert.predict`); both are
saved and loaded with the model. :func:`fit_temperature` is also the temperature scaling
of the deterministic baseline (one sample).

With ``outliers`` (inputs that are not of the task, e.g. :func:`synthetic_outliers` made
from the validation inputs), :func:`calibrate_posterior` chooses t for out-of-distribution
detection instead: among the scales whose validation NLL is no worse than the model's at
its means (temperature scaling), the one whose predictive entropy best separates the
validation inputs from the outliers.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._utils import (
    BatchFormat,
    as_batch_format,
    batch_length,
    check_positive_int,
    chunk_inputs,
    eval_mode,
    model_device,
    move_inputs,
)
from .convert import INFO_ATTR
from .layers import bayesian_layers, set_sigma_scale
from .losses import data_task
from .metrics import auc, entropy_of_expectation
from .predict import predictive_of, set_predictive
from .sampling import mc_outputs

__all__ = [
    "DEFAULT_SCALES",
    "MAX_TEMPERATURE",
    "MIN_NOISY_TEMPERATURE",
    "Calibration",
    "calibrate_posterior",
    "fit_temperature",
    "predictive_nll",
    "set_temperature",
    "synthetic_outliers",
]

MAX_TEMPERATURE = 100.0
""":func:`fit_temperature` keeps T within [1 / MAX_TEMPERATURE, MAX_TEMPERATURE]."""

MIN_NOISY_TEMPERATURE = 0.5
"""The lowest T :func:`calibrate_posterior` fits at a sigma scale t > 0. A T far below 1
sharpens every sample towards one-hot, and the Monte Carlo predictive becomes the fraction
of samples that vote for each class: with many samples that can score a low NLL on the
validation items, yet a new item on which every sample is wrong then costs an NLL of the
order of its logit gap / T. In the posterior study (``benchmarks/posterior_study/
samples.md``) S = 300 without this bound chose T = 0.06 and 0.014 on two seeds, and the
test NLL rose to 0.134 and 0.170 (temperature scaling: 0.128 and 0.127). Every T chosen
without noise in the study (temperature scaling, digits and nuclei) lay in [0.73, 1.54]:
0.5 is a round number below those, not a tuned value."""

DEFAULT_SCALES = (0.0, 0.0625, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""The sigma scales t tried by :func:`calibrate_posterior` (0: the means); the best
positive one is then refined by a factor sqrt(2) on each side."""


@dataclass
class Calibration:
    """What :func:`calibrate_posterior` chose, and the validation NLL at every scale.

    Attributes:
        scale: t, the multiplier of every sigma (0: the means).
        temperature: T of the predictive (1 when not fitted).
        nll: the validation NLL of the predictive at (t, T).
        curve: [(t, T fitted at t, validation NLL)] for every t tried, by t.
        samples: S posterior samples per prediction.
        seconds: wall time.
        outlier_auroc: {t: AUROC of the predictive entropy, validation inputs against the
            outliers} for every t tried, when ``calibrate_posterior`` was given outliers
            (the objective "outliers"); empty otherwise (the objective "nll").
        predictive: "sample" (Monte Carlo) or "probit" (closed form, S = 1); see
            :func:`bnnconvert.predict.set_predictive`.
    """

    scale: float
    temperature: float
    nll: float
    curve: list[tuple[float, float, float]]
    samples: int
    seconds: float = math.nan
    outlier_auroc: dict[float, float] = field(default_factory=dict)
    predictive: str = "sample"

    @property
    def objective(self) -> str:
        """ "outliers" if t was chosen for separating outliers, else "nll"."""
        return "outliers" if self.outlier_auroc else "nll"

    def __str__(self) -> str:
        text = (
            f"scale t = {self.scale:.4g}, temperature T = {self.temperature:.4g}, validation "
            f"NLL {self.nll:.4f} ({len(self.curve)} scales tried, "
            + ("probit predictive)" if self.predictive == "probit" else f"S = {self.samples})")
        )
        if self.outlier_auroc:
            text += f", outlier AUROC {self.outlier_auroc[self.scale]:.4f}"
        return text


def predictive_nll(
    outputs: Tensor,
    targets: Tensor,
    *,
    activation: str = "softmax",
    temperature: float | Tensor = 1.0,
) -> Tensor:
    """The NLL of the Monte Carlo predictive mean_s p(y | outputs_s / T), averaged over
    items (and pixels or labels), in float64.

    Args:
        outputs: (S, N, C, *spatial) logits for "softmax" (class dimension 2), or
            (S, N, L, *spatial) for "sigmoid" (a Bernoulli per entry).
        targets: (N, *spatial) class indices (or (N, 1, *spatial)); (N, L, *spatial) 0/1.
        temperature: T > 0, a float or a scalar tensor (differentiable).
    """
    s = outputs.shape[0]
    z = outputs.double() / temperature
    if activation == "softmax":
        y = targets.long().to(outputs.device)
        if y.dim() == outputs.dim() - 1:  # (N, 1, *spatial) class indices
            y = y.squeeze(1)
        index = y.unsqueeze(0).unsqueeze(2).expand(s, *y.shape[:1], 1, *y.shape[1:])
        picked = z.log_softmax(2).gather(2, index).squeeze(2)
    elif activation == "sigmoid":
        y = targets.to(outputs.device, torch.float64)
        picked = y * F.logsigmoid(z) + (1 - y) * F.logsigmoid(-z)
    else:
        raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
    return -(torch.logsumexp(picked, 0) - math.log(s)).mean()


def fit_temperature(
    outputs: Tensor,
    targets: Tensor,
    *,
    activation: str = "softmax",
    max_iter: int = 100,
    warn: bool = True,
    min_temperature: float = 1 / MAX_TEMPERATURE,
) -> float:
    """The temperature T > 0 minimising :func:`predictive_nll` of S samples of outputs
    (S, N, ...): S = 1 is classical temperature scaling (Guo et al., 2017). Optimised over
    log T with LBFGS (strong-Wolfe line search) from T = 1, within
    [min_temperature, MAX_TEMPERATURE]: a model whose predictions are no better than
    chance drives T to infinity; T then stops at the bound, with a warning if ``warn``."""
    if not (isinstance(min_temperature, (int, float)) and 0 < min_temperature <= 1):
        raise ValueError(f"min_temperature must be in (0, 1], got {min_temperature!r}")
    outputs = outputs.detach()
    bound = math.log(MAX_TEMPERATURE)
    low = max(math.log(min_temperature), -bound)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        t = log_t.clamp(low, bound).exp()
        loss = predictive_nll(outputs, targets, activation=activation, temperature=t)
        loss.backward()
        return loss

    optimizer.step(closure)
    value = float(log_t.detach().clamp(low, bound).exp())
    if warn and abs(math.log(value)) >= bound - 1e-6:
        warnings.warn(
            f"the temperature reached its bound {value:g}: the predictions carry almost no "
            "information about the targets (is the model trained, are these the right "
            "targets?)",
            stacklevel=2,
        )
    return value


def calibrate_posterior(
    model: nn.Module,
    val_data: Iterable,
    *,
    task: str | None = None,
    samples: int | None = None,
    scales: Sequence[float] = DEFAULT_SCALES,
    temperature: bool = True,
    refine: bool = True,
    chunk: int | None = 32,
    seed: int = 0,
    device: str | torch.device | None = None,
    batch_format: BatchFormat | None = None,
    min_temperature: float = MIN_NOISY_TEMPERATURE,
    outliers: Tensor | Iterable | None = None,
    predictive: str | None = None,
) -> Calibration:
    """Choose the sigma scale t, and the predictive's temperature T, on validation data.

    For every t of ``scales`` the S posterior samples of each validation batch are drawn
    with the same random numbers (common random numbers: the noise is t * sigma * eps with
    the same eps), T is fitted by :func:`fit_temperature` (or stays 1), and the pair with
    the lowest validation NLL wins; with ``refine``, t / sqrt(2) and t * sqrt(2) around the
    best positive t are tried too. t = 0 is the model at its means (with T: temperature
    scaling), so on the validation data the result is never worse than either. The
    validation outputs are held in memory on the CPU (S x N x outputs). Cost: one pass of
    S samples over the validation data per t.

    The chosen t is written into every Bayesian layer (``bayes_scale``), T into
    ``model.bnnconvert_info["temperature"]``, which :func:`bnnconvert.predict` applies, and
    S into ``model.bnnconvert_info["samples"]``, :func:`bnnconvert.predict`'s default S for
    this model (t and T were chosen for that many draws).

    With ``predictive="probit"`` (a Bayesian output layer: see
    :func:`bnnconvert.predict.set_predictive`) the predictive is the closed-form
    softmax(mean / sqrt(1 + pi/8 t^2 variance) / T): no Monte Carlo noise, one forward per
    t, S = 1.

    Args:
        model: a converted model (its sigma fitted, e.g. by :func:`fit_posterior`).
        val_data: (input, target) batches; never the test split.
        task: "multiclass", "multilabel" or "segmentation" (default: the data's).
        samples: S (None: 10; 1 with the probit predictive, which draws nothing).
        scales: the t to try (numbers >= 0).
        temperature: fit T (else T = 1).
        refine: refine the best positive t (see above).
        chunk: forward at most this many items at a time. A forward draws one weight
            sample for its whole batch, so a validation batch of 250 with S = 10 rests on
            10 draws; chunks of 32 give each group of 32 items its own draws (the same
            FLOPs), which makes the validation NLL of every t far less noisy. None: the
            batches as given.
        seed: the random numbers shared by every t.
        device: where to run (default: where the model is).
        batch_format: how to read mapping batches and structured outputs
            (:class:`bnnconvert.BatchFormat`).
        min_temperature: the lowest T fitted at t > 0 with Monte Carlo samples
            (:data:`MIN_NOISY_TEMPERATURE`: a lower T turns the predictive into a vote count
            of the samples); at t = 0 and with the probit predictive, T ranges down to
            1 / MAX_TEMPERATURE as in temperature scaling.
        outliers: inputs that are not of the task (a tensor (M, ...) or batches of inputs,
            e.g. :func:`synthetic_outliers` of the validation inputs; never the test
            split's OOD set). With them t is chosen for out-of-distribution detection:
            among the scales whose validation NLL (at its fitted T) is at most the NLL at
            t = 0 (temperature scaling), the one with the highest AUROC of the predictive
            entropy, validation inputs against outliers (ties: the smaller t); t = 0 is
            always tried. The outliers cost one more pass of S samples per t.
        predictive: "sample" or "probit" (:data:`bnnconvert.predict.PREDICTIVES`), stored
            in the model; None: the model's (:func:`bnnconvert.predict.predictive_of`).

    Returns a :class:`Calibration`.
    """
    scales = _check_scales(scales)
    _check_outliers(outliers)
    fmt = as_batch_format(batch_format)
    if chunk is not None:
        check_positive_int(chunk=chunk)
    if not any(True for _ in bayesian_layers(model)):
        raise ValueError("the model has no Bayesian entry; convert it with bnnconvert.convert()")
    predictive = predictive_of(model) if predictive is None else predictive
    samples = _check_samples(samples, predictive)
    if predictive != predictive_of(model) or predictive == "probit":
        set_predictive(model, predictive, _first_inputs(val_data, fmt), batch_format=fmt)
    if predictive == "probit":
        min_temperature = 1 / MAX_TEMPERATURE
    task = task or data_task(val_data) or "multiclass"
    activation = "sigmoid" if task == "multilabel" else "softmax"
    start = time.perf_counter()
    curve: list[tuple[float, float, float]] = []
    separation: dict[float, float] = {}
    if outliers is not None and 0.0 not in scales:
        scales = [0.0, *scales]

    def evaluate(t: float) -> None:
        set_sigma_scale(model, t)
        outputs, targets = _validation_outputs(model, val_data, samples, seed, device, chunk, fmt)
        temp = 1.0
        if temperature:  # large t can make every prediction uninformative: T at its bound
            low = min_temperature if t > 0 else 1 / MAX_TEMPERATURE
            temp = fit_temperature(
                outputs, targets, activation=activation, warn=False, min_temperature=low
            )
        nll = float(predictive_nll(outputs, targets, activation=activation, temperature=temp))
        curve.append((t, temp, nll))
        if outliers is not None:
            far = _outlier_outputs(model, outliers, samples, seed, device, chunk, fmt)
            separation[t] = _entropy_auroc(outputs, far, temp, activation)

    for t in scales:
        evaluate(t)
    best = _best(curve, separation)
    if refine and best[0] > 0:
        for t in (best[0] / math.sqrt(2), best[0] * math.sqrt(2)):
            evaluate(t)
        best = _best(curve, separation)
    set_sigma_scale(model, best[0])
    set_temperature(model, best[1])
    getattr(model, INFO_ATTR)["samples"] = samples  # predict's default S from now on
    if abs(math.log(best[1])) >= math.log(MAX_TEMPERATURE) - 1e-6:
        warnings.warn(
            f"the chosen temperature is at its bound {best[1]:g}: the model's predictions "
            "carry almost no information about the validation targets (is it trained, are "
            "these the right targets?)",
            stacklevel=2,
        )
    curve.sort()
    seconds = time.perf_counter() - start
    return Calibration(best[0], best[1], best[2], curve, samples, seconds, separation, predictive)


def _check_samples(samples: int | None, predictive: str) -> int:
    """S of a calibration: ``samples``, else 10 (1 for the probit predictive)."""
    if samples is None:
        return 1 if predictive == "probit" else 10
    check_positive_int(samples=samples)
    if predictive == "probit" and samples != 1:
        raise ValueError(
            f"the probit predictive draws no sample: pass samples=None (or 1), got {samples}"
        )
    return samples


def _first_inputs(data: Iterable, fmt: BatchFormat) -> object:
    """The inputs of the first batch of ``data``."""
    for batch in data:
        return fmt.split(batch)[0]
    raise ValueError("val_data is empty: it yielded no batch")


def _best(
    curve: list[tuple[float, float, float]], separation: dict[float, float]
) -> tuple[float, float, float]:
    """The (t, T, NLL) row of the lowest NLL; with ``separation`` ({t: outlier AUROC}),
    among the rows whose NLL is at most the NLL at t = 0, the highest AUROC (then the
    smaller t)."""
    if not separation:
        return min(curve, key=lambda row: row[2])
    reference = min(row[2] for row in curve if row[0] == 0.0)
    admissible = [row for row in curve if row[2] <= reference]
    return max(admissible, key=lambda row: (separation[row[0]], -row[0]))


def _entropy_auroc(inside: Tensor, outside: Tensor, temperature: float, activation: str) -> float:
    """AUROC of the entropy of the Monte Carlo predictive at ``temperature``, one score
    per item (the mean over pixels or labels): ``outside`` (S, M, ...) outputs are the
    positives, ``inside`` (S, N, ...) the negatives."""
    scores = []
    for outputs in (inside, outside):
        z = outputs.double() / temperature
        probs = (z.sigmoid() if activation == "sigmoid" else z.softmax(2)).mean(0)
        task = "multilabel" if activation == "sigmoid" else "multiclass"
        entropy = entropy_of_expectation(probs, task=task)
        scores.append(entropy.flatten(1).mean(1) if entropy.dim() > 1 else entropy)
    labels = torch.cat([torch.zeros(len(scores[0])), torch.ones(len(scores[1]))]).long()
    return float(auc(torch.cat(scores)[:, None], labels[:, None], task="multilabel"))


def _check_outliers(outliers: object) -> None:
    if isinstance(outliers, (str, bytes)) or not (
        outliers is None or isinstance(outliers, (Tensor, Iterable))
    ):
        raise TypeError(
            f"outliers must be a tensor (M, ...) of inputs or batches of inputs, got "
            f"{outliers!r:.60}; for outliers made from the validation inputs pass "
            "bnnconvert.synthetic_outliers(val_inputs)"
        )


def _check_scales(scales: Sequence[float]) -> list[float]:
    values = list(scales)
    if not values:
        raise ValueError("scales is empty; pass numbers >= 0, e.g. (0, 0.5, 1, 2)")
    for t in values:
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise TypeError(f"scales must be numbers, got {t!r}")
        if not (math.isfinite(t) and t >= 0):
            raise ValueError(f"scales must be finite numbers >= 0, got {t!r}")
    return [float(t) for t in values]


def _validation_outputs(
    model: nn.Module,
    data: Iterable,
    samples: int,
    seed: int,
    device,
    chunk: int | None,
    fmt: BatchFormat,
) -> tuple[Tensor, Tensor]:
    """(S, N, ...) float32 CPU outputs and (N, ...) targets, under a forked RNG seeded
    with ``seed`` (the caller's random state is left as it was)."""
    targets = []

    def inputs() -> Iterator:
        for batch in data:
            x, y = fmt.split(batch)
            if y is None:
                raise ValueError(
                    "val_data must yield (input, target) batches (or mappings read with "
                    "target_key=...)"
                )
            targets.append(y.cpu())
            yield x

    outputs = _sampled_outputs(model, inputs(), samples, seed, device, chunk, fmt, "val_data")
    return outputs, torch.cat(targets)


def _outlier_outputs(
    model: nn.Module, outliers, samples: int, seed: int, device, chunk, fmt: BatchFormat
) -> Tensor:
    """(S, M, ...) outputs of the outliers: a tensor (M, ...) or batches of inputs (or of
    (input, target) pairs, the targets ignored)."""
    if isinstance(outliers, Tensor):
        inputs = outliers.split(256)
    else:
        inputs = (b if isinstance(b, Tensor) else fmt.split(b)[0] for b in outliers)
    return _sampled_outputs(model, inputs, samples, seed + 1, device, chunk, fmt, "outliers")


def _sampled_outputs(
    model: nn.Module,
    inputs: Iterable,
    samples: int,
    seed: int,
    device,
    chunk: int | None,
    fmt: BatchFormat,
    name: str,
) -> Tensor:
    """(S, N, ...) float32 CPU outputs of the input batches (iterated under a forked RNG
    seeded with ``seed``), S draws per forward of at most ``chunk`` items."""
    where = torch.device(device) if device is not None else model_device(model)
    outs = []
    with torch.random.fork_rng(devices=[where] if where.type == "cuda" else []):
        torch.manual_seed(seed)
        with eval_mode(model), torch.no_grad():
            for x in inputs:
                for part in chunk_inputs(x, chunk or batch_length(x)):
                    out = mc_outputs(model, move_inputs(part, where), samples, batch_format=fmt)
                    outs.append(out.float().cpu())
    if not outs:
        raise ValueError(f"{name} is empty: it yielded no batch")
    return torch.cat(outs, 1)


def set_temperature(model: nn.Module, value: float) -> None:
    """Store the predictive's temperature T in a converted model's info."""
    info = getattr(model, INFO_ATTR, None)
    if not isinstance(info, dict):
        raise ValueError("the model was not converted by bnnconvert.convert(); no info to store T")
    info["temperature"] = float(value)


def synthetic_outliers(inputs: Tensor, *, seed: int = 0) -> Tensor:
    """Inputs that are not of the task, made from (validation) inputs (N, ...), for
    :func:`calibrate_posterior`'s ``outliers`` when no real out-of-distribution set is at
    hand: the first N // 2 are the inputs with their entries shuffled (each item its own
    permutation: the same values, no structure), the others uniform noise smoothed by a
    5-wide box filter over the spatial dimensions of 2-D or 3-D images (N, C, H, W) or
    (N, C, D, H, W) (other shapes: unsmoothed), each item stretched to the range of the
    inputs. The two kinds follow Hein et al. (CVPR 2019), who used permuted pixels and
    smoothed uniform noise as out-of-distribution inputs.

    Args:
        inputs: (N, ...) floating-point inputs, N >= 2.
        seed: the random permutations and noise.

    Returns a tensor of the shape, dtype and device of ``inputs``.
    """
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
        raise TypeError(f"inputs must be a floating-point tensor (N, ...), got {inputs!r:.80}")
    if len(inputs) < 2:
        raise ValueError(f"synthetic_outliers needs N >= 2 inputs, got {len(inputs)}")
    generator = torch.Generator().manual_seed(seed)
    x = inputs.detach().cpu()
    half = len(x) // 2
    flat = x[:half].flatten(1)
    order = torch.stack([torch.randperm(flat.shape[1], generator=generator) for _ in flat])
    shuffled = flat.gather(1, order).view_as(x[:half])
    noise = torch.rand(len(x) - half, *x.shape[1:], generator=generator, dtype=x.dtype)
    pool = {4: F.avg_pool2d, 5: F.avg_pool3d}.get(x.dim())
    if pool is not None:
        noise = pool(noise, 5, stride=1, padding=2, count_include_pad=False)
    low = noise.flatten(1).amin(1).view(-1, *[1] * (x.dim() - 1))
    high = noise.flatten(1).amax(1).view(-1, *[1] * (x.dim() - 1))
    unit = (noise - low) / (high - low).clamp_min(torch.finfo(x.dtype).tiny)
    noise = x.min() + unit * (x.max() - x.min())
    return torch.cat([shuffled, noise]).to(inputs.device)
