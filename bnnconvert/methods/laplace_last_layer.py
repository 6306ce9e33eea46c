"""Last-layer Laplace (laplace-torch): the post hoc Gaussian posterior users compare with.

The network is trained on like the deterministic baseline, then laplace-torch's
``Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure=...)``
is fitted on the training data: a Gaussian over the weights of the last Linear layer
whose precision is the generalized Gauss-Newton of the training NLL plus a scalar prior
precision fitted by the marginal likelihood (Daxberger et al., 2021, *Laplace Redux*).
laplace-torch is an optional dependency: ``pip install "bnnconvert[compare]"``.

Applied post hoc to a trained checkpoint, it is a fit without training::

    method = LaplaceLastLayer(trained_model).fit(train_loader, epochs=0)
    prediction = method.predict(test_loader)

Mapping batches and structured outputs are read by the fit's ``batch_format`` (a
:class:`~bnnconvert.BatchFormat`) as by every other method: laplace-torch sees the network
through :class:`_LogitsNet` (inputs -> the logits tensor), and keyword inputs reach it as
a mapping (its Hugging Face path, ``dict_key_x``/``dict_key_y``)::

    fmt = BatchFormat(input_key=["pixel_values"], target_key="labels")
    method = LaplaceLastLayer(hf_model).fit(dict_loader, epochs=0, batch_format=fmt)
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .._utils import (
    BatchFormat,
    Inputs,
    as_batch_format,
    batch_length,
    call_model,
    check_positive_int,
    model_device,
    move_inputs,
    split_batch,
)
from .base import FitRun, Method, model_flops

__all__ = ["HESSIAN_STRUCTURES", "LINK_APPROXIMATIONS", "PRED_TYPES", "LaplaceLastLayer"]

HESSIAN_STRUCTURES = ("kron", "diag", "full")
"""The last-layer Hessian approximations: Kronecker-factored, diagonal, dense."""

PRED_TYPES = ("glm", "nn")
"""The predictives: "glm" (the network linearised in the last-layer weights), "nn"
(the network with last-layer weights sampled from the posterior)."""

LINK_APPROXIMATIONS = ("probit", "bridge", "bridge_norm", "mc")
"""How the softmax of the Gaussian outputs is approximated: closed forms (the "glm"
predictive only) or Monte Carlo samples ("mc")."""

_ALTERNATIVES = "'temperature', 'mc_dropout', 'ensembleM', 'last_layer' or 'partialP'"
_INSTALL = 'pip install "bnnconvert[compare]"'
_TARGET = "_bnnconvert_target"
"""The key of the target in the keyword-input batches handed to laplace-torch."""


class LaplaceLastLayer(Method):
    """Last-layer Laplace of laplace-torch, after the deterministic baseline's training.

    ``fit`` trains the model with the plain NLL for ``epochs`` epochs (0: none, the
    post hoc use on a trained checkpoint), fits the Laplace approximation of the last
    Linear layer on the training batches and its scalar prior precision by the
    marginal likelihood (laplace-torch's ``optimize_prior_precision(method="marglik")``).
    The Hessian is that of the unweighted cross-entropy, also when training used class
    weights.

    Prediction returns log-probabilities as the "logits" (softmax(log p) = p), so
    :meth:`predict`, the metrics and the OOD AUROC use them unchanged: with a closed-form
    link ("probit", "bridge", "bridge_norm") one output (1, N, C), the predictive of
    ``la(x, pred_type="glm", link_approx=...)``; with ``link_approx="mc"`` the S
    predictive samples (S, N, C) of ``la.predictive_samples(x, pred_type, n_samples=S)``,
    whose mean is ``la(x, pred_type, link_approx="mc", n_samples=S)``.

    Args:
        model: a classifier whose logits (N, C) (its output, read by the fit's
            ``batch_format``) are the output of its last ``nn.Linear`` layer; deep-copied.
        task: "multiclass" (or None: the data's task, else "multiclass"); other tasks
            raise ValueError.
        samples: S, the Monte Carlo samples of the "mc" predictive (ignored otherwise).
        hessian_structure: "kron" (default), "diag" or "full" (:data:`HESSIAN_STRUCTURES`).
        pred_type: "glm" (default) or "nn" (which needs ``link_approx="mc"``).
        link_approx: "probit" (default), "bridge", "bridge_norm" or "mc".
        last_layer: the name of the last Linear layer in ``model.named_modules()``
            (None: laplace-torch finds the last module called).
        marglik_steps: Adam steps of the marginal-likelihood fit of the prior precision.
        name: see :class:`~bnnconvert.methods.Method`.

    Attributes:
        laplace: the fitted laplace-torch object (None before :meth:`fit`).
        prior_precision: the fitted scalar prior precision (NaN before :meth:`fit`).
        laplace_seconds: seconds of the Laplace fit and the prior precision's fit
            (the training before it excluded).
        hessian_batches: training batches of the Hessian pass of the last fit.

    Raises ImportError, saying ``pip install "bnnconvert[compare]"``, without
    laplace-torch.
    """

    name = "laplace_ll"

    def __init__(
        self,
        model: nn.Module,
        *,
        task: str | None = None,
        samples: int = 5,
        hessian_structure: str = "kron",
        pred_type: str = "glm",
        link_approx: str = "probit",
        last_layer: str | None = None,
        marglik_steps: int = 100,
        name: str | None = None,
    ) -> None:
        _check_choice("hessian_structure", hessian_structure, HESSIAN_STRUCTURES)
        _check_choice("pred_type", pred_type, PRED_TYPES)
        _check_choice("link_approx", link_approx, LINK_APPROXIMATIONS)
        if pred_type == "nn" and link_approx != "mc":
            raise ValueError(
                f"pred_type='nn' samples the network, so it needs link_approx='mc', got "
                f"link_approx={link_approx!r}; or use pred_type='glm' with {link_approx!r}"
            )
        check_positive_int(marglik_steps=marglik_steps)
        super().__init__(model, task=task, samples=samples, name=name)
        if last_layer is not None and not isinstance(
            dict(model.named_modules()).get(last_layer), nn.Linear
        ):
            raise ValueError(
                f"last_layer={last_layer!r} is not the name of an nn.Linear of the model; "
                "pass a name of model.named_modules(), or None to let laplace-torch find it"
            )
        self.hessian_structure = hessian_structure
        self.pred_type = pred_type
        self.link_approx = link_approx
        self.last_layer = last_layer
        self.marglik_steps = marglik_steps
        self.stochastic = link_approx == "mc"
        self.laplace: Any = None
        self.prior_precision = float("nan")
        self.laplace_seconds = 0.0
        self.hessian_batches = 0

    @classmethod
    def check_available(cls, task: str | None = None) -> None:
        """ImportError without laplace-torch; ValueError unless ``task`` is "multiclass"
        (or None)."""
        if task is not None and task != "multiclass":
            raise ValueError(
                f"last-layer Laplace (laplace-torch) needs task='multiclass' (one softmax "
                f"over (N, C) outputs), got task={task!r}; for {task} compare with "
                f"{_ALTERNATIVES} instead"
            )
        _laplace_factory()

    def train_model(self, run: FitRun) -> None:
        """NLL training for ``run.epochs`` epochs, then the Laplace fit and its prior."""
        self.model = self._fresh()
        self.laplace = None
        self._train(self.model, run)
        start = time.perf_counter()
        self.laplace = self._fit_laplace(self.model, run.train_data)
        self.model = self.laplace.model.model.net  # the trained network laplace-torch holds
        self.laplace_seconds = time.perf_counter() - start

    def outputs(self, x: Inputs, samples: int) -> Tensor:
        """Log predictive probabilities on one batch x (N, ...) (or keyword inputs
        {key: (N, ...)}): (1, N, C) for a closed-form link, (S, N, C) predictive samples
        for ``link_approx="mc"``."""
        if self.laplace is None:
            raise RuntimeError(f"{self.name}: call fit(train_data, epochs=...) before predict")
        x = _KeywordInputs(x) if isinstance(x, Mapping) else x
        if self.link_approx == "mc":
            probs = self.laplace.predictive_samples(x, pred_type=self.pred_type, n_samples=samples)
        else:
            probs = self.laplace(x, pred_type="glm", link_approx=self.link_approx)[None]
        return probs.log()

    def num_parameters(self) -> int:
        """The network's parameters plus the entries of the last-layer posterior
        precision (kron: its two eigendecomposed factors; diag: P; full: P x P)."""
        extra = 0 if self.laplace is None else _tensor_entries(self.laplace.posterior_precision)
        return super().num_parameters() + extra

    def flops(self, inputs: Tensor | Sequence[Tensor] | Mapping[str, Tensor]) -> dict[str, int]:
        """As :meth:`Method.flops`, with "inference" one forward (the features are
        computed once; the last-layer predictive, covariance products or S samples of
        the last layer, is not counted) and "train_run" plus one forward per batch of
        the Hessian pass."""
        cost = model_flops(
            self.model,
            inputs,
            inference_samples=1,
            train_samples=1,
            steps=self.train_steps,
            batch_format=self.batch_format,
        )
        cost["train_run"] += self.hessian_batches * cost["forward"]
        return cost

    def _fit_laplace(self, model: nn.Module, data: Iterable) -> Any:
        """laplace-torch's last-layer Laplace of ``model`` fitted on ``data``, with the
        marginal-likelihood prior precision."""
        fmt = as_batch_format(self.batch_format)
        la = _laplace_factory()(
            _LogitsNet(model, fmt),
            "classification",
            subset_of_weights="last_layer",
            hessian_structure=self.hessian_structure,
            last_layer_name=None if self.last_layer is None else f"net.{self.last_layer}",
            **_dict_keys(fmt),
        )
        batches = _LaplaceBatches(data, fmt, model_device(model))
        self.hessian_batches = batches.num_batches
        try:
            la.fit(batches)
        except ValueError as exc:
            if la.model.last_layer is None:  # laplace-torch found no Linear output layer
                raise ValueError(
                    "last-layer Laplace needs a model whose last module called is an "
                    f"nn.Linear producing the (N, C) output ({exc}); pass last_layer=<the "
                    "name of the output layer> if another module runs after it"
                ) from exc
            raise
        _check_last_layer_output(la, _batch_inputs(next(iter(batches))))
        with warnings.catch_warnings():  # laplace-torch's reminder to pass link_approx
            warnings.filterwarnings("ignore", message="By default `link_approx`")
            la.optimize_prior_precision(
                pred_type=self.pred_type,
                method="marglik",
                link_approx=self.link_approx,
                prior_structure="scalar",
                n_steps=self.marglik_steps,
            )
        self.prior_precision = float(la.prior_precision)
        return la


class _LogitsNet(nn.Module):
    """The user's network as laplace-torch calls it: one input tensor (N, ...), or keyword
    inputs {key: (N, ...)} (other entries, such as the target, ignored) -> the logits
    (N, C), read from its output by ``fmt``."""

    def __init__(self, net: nn.Module, fmt: BatchFormat) -> None:
        super().__init__()
        self.net = net
        self.fmt = fmt

    def forward(self, inputs: Inputs) -> Tensor:
        """Logits (N, C) of ``net`` on ``inputs`` (a tensor (N, ...) or a mapping)."""
        if isinstance(inputs, Mapping):
            inputs = {key: inputs[key] for key in self.fmt.input_key}
        return self.fmt.output(call_model(self.net, inputs))


class _KeywordInputs(dict):
    """Keyword inputs {key: (N, ...)} as laplace-torch takes them: a mapping (its Hugging
    Face path) that also moves like a tensor (its "nn" predictive calls ``X.to(device)``)."""

    def to(self, device: torch.device | str) -> _KeywordInputs:
        """The same inputs on ``device``."""
        return _KeywordInputs(move_inputs(self, device))


def _dict_keys(fmt: BatchFormat) -> dict[str, str]:
    """laplace-torch's keys of mapping batches: the first keyword input (its batch size)
    and the target entry :class:`_LaplaceBatches` adds; none for tensor inputs."""
    return {"dict_key_x": fmt.input_key[0], "dict_key_y": _TARGET} if fmt.keywords else {}


def _batch_inputs(batch: tuple[Tensor, Tensor] | _KeywordInputs) -> Inputs:
    """The inputs of a batch of :class:`_LaplaceBatches`: x (N, ...) or the mapping."""
    return batch if isinstance(batch, Mapping) else batch[0]


class _LaplaceBatches:
    """The batches of ``data`` (read by ``fmt``) as laplace-torch's ``fit`` reads them
    from a DataLoader, with a ``dataset`` of its size: (input (N, ...), class index (N,)),
    or for keyword inputs one mapping {key: (N, ...), target key: (N,)} on ``device``."""

    def __init__(
        self, data: Iterable, fmt: BatchFormat, device: torch.device | None = None
    ) -> None:
        self.data = data
        self.fmt = fmt
        self.device = device or torch.device("cpu")
        examples, self.num_batches = _data_size(data, fmt)
        self.dataset = range(examples)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor] | _KeywordInputs]:
        for batch in self.data:
            x, y = split_batch(batch, need_target=True, batch_format=self.fmt)
            y = _class_indices(y)
            if isinstance(x, Mapping):
                yield _KeywordInputs({**move_inputs(x, self.device), _TARGET: y})
            else:
                yield x, y


def _class_indices(y: Tensor) -> Tensor:
    """Targets (N,) or (N, 1) as class indices (N,) (long); ValueError otherwise."""
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dim() != 1 or y.is_floating_point():
        raise ValueError(
            f"last-layer Laplace needs class-index targets (N,) or (N, 1), got "
            f"{tuple(y.shape)} ({y.dtype}); pass a multi-class data set"
        )
    return y.long()


def _data_size(data: Iterable, fmt: BatchFormat) -> tuple[int, int]:
    """(examples, batches) of one pass over ``data`` (read from a sized DataLoader,
    else counted by a pass)."""
    if isinstance(data, DataLoader) and data.batch_size is not None:
        try:
            batches = len(data)
            examples = batches * data.batch_size if data.drop_last else len(data.sampler)
            return examples, batches
        except TypeError:  # an iterable dataset without a length
            pass
    sizes = [batch_length(split_batch(batch, batch_format=fmt)[0]) for batch in data]
    return sum(sizes), len(sizes)


def _check_last_layer_output(la: Any, x: Inputs) -> None:
    """ValueError unless the model's logits are its last Linear layer's output (what the
    last-layer Jacobians of laplace-torch assume), checked on a few inputs x (N, ...) or
    keyword inputs."""
    wrapper, last = la.model.model, la.model.last_layer
    x = _first_rows(x, 8)
    with torch.no_grad():
        out, features = la.model.forward_with_features(x.to(model_device(wrapper)))
        expected = last(features)
    if out.shape != expected.shape or not torch.allclose(out, expected, rtol=1e-4, atol=1e-5):
        name = next(n for n, m in wrapper.net.named_modules() if m is last)
        raise ValueError(
            f"the model's output is not the output of its last Linear layer {name!r}, "
            "which last-layer Laplace assumes; pass "
            "last_layer=<the name of the output layer>, or remove what the forward applies "
            "after it (e.g. a log_softmax)"
        )


def _first_rows(x: Inputs, n: int) -> Tensor | _KeywordInputs:
    """The first ``n`` rows of x (N, ...) or of every entry of keyword inputs."""
    if isinstance(x, Mapping):
        return _KeywordInputs({key: value[:n] for key, value in x.items()})
    return x[:n]


def _tensor_entries(value: Any) -> int:
    """Entries of the tensors of a posterior precision: a tensor, or laplace-torch's
    eigendecomposed Kronecker factors (``eigenvectors``, ``eigenvalues``)."""
    if isinstance(value, Tensor):
        return value.numel()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_entries(v) for v in value)
    return _tensor_entries(value.eigenvectors) + _tensor_entries(value.eigenvalues)


def _laplace_factory() -> Any:
    """laplace-torch's ``Laplace`` (an optional dependency, imported here)."""
    try:
        from laplace import Laplace
    except ImportError as exc:
        raise ImportError(
            f"last-layer Laplace needs laplace-torch, which is not installed: {_INSTALL}"
        ) from exc
    return Laplace


def _check_choice(argument: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{argument} must be one of {', '.join(choices)}, got {value!r}")
