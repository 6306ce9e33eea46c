"""Helpers shared by the whole package; each is defined here and nowhere else.

Nothing here knows about Bayesian layers, training or the command line: files (atomic
writes, output checks, the ``{"format", "version"}`` header of the package's files),
argument checks, batches, devices, ``"package.module:attribute"`` specs and JSON.

Errors follow the package's convention (``docs/architecture.md``): ValueError for a bad
value, TypeError for a value of the wrong type, FileNotFoundError for a missing file or
folder, PermissionError for one that cannot be written; every message names the
argument (never a command-line flag) and says what to do.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

__all__ = [
    "BatchFormat",
    "Inputs",
    "TupleCollate",
    "as_batch_format",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "batch_length",
    "call_arguments",
    "call_model",
    "check_output_folder",
    "check_output_path",
    "check_payload",
    "check_positive_int",
    "chunk_inputs",
    "first_line",
    "inputs_device",
    "is_main_process",
    "json_safe",
    "load_payload",
    "model_device",
    "move_inputs",
    "resolve_device",
    "resolve_factory",
    "split_batch",
    "staged_folder",
    "tuple_batches",
]

FACTORY_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
"""A ``"package.module:attribute"`` spec (the attribute may be dotted)."""


# ----------------------------------------------------------------------- processes
def is_main_process() -> bool:
    """False on every rank but 0 of an initialised torch.distributed process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# ----------------------------------------------------------------------- files
def check_output_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path; fails early (before any long computation) if it cannot be
    written: a folder (ValueError), a missing parent folder (FileNotFoundError) or one
    without write permission (PermissionError)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"output {path} is a folder; pass a file name such as {path}/model.pt")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {path.parent}; create it first")
    if not os.access(path.parent, os.W_OK):
        raise PermissionError(f"cannot write to {path.parent}")
    return path


def check_output_folder(folder: str | os.PathLike) -> Path:
    """``folder`` as a Path; fails early if files cannot be written into it: a file of
    that name (ValueError), a missing parent (FileNotFoundError), no write permission."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output {folder} is a file; pass a folder name, e.g. {folder}_dir")
    parent = folder if folder.is_dir() else folder.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"output folder's parent does not exist: {parent}; create it")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write to {parent}")
    return folder


def _atomic_write(path: str | os.PathLike, write: Callable[[Path], None], all_ranks: bool):
    """``write(tmp)`` to a temporary file beside ``path``, then rename it to ``path``: a
    reader sees the old file or the new one, never a torn one. Under torch.distributed
    only rank 0 writes, unless ``all_ranks``."""
    if not (all_ranks or is_main_process()):
        return
    path = check_output_path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str, *, all_ranks: bool = False) -> None:
    """Write ``text`` (UTF-8) atomically; rank 0 only under torch.distributed."""
    _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), all_ranks)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, all_ranks: bool = False) -> None:
    """Write ``data`` atomically; rank 0 only under torch.distributed."""
    _atomic_write(path, lambda tmp: tmp.write_bytes(data), all_ranks)


def atomic_torch_save(obj: object, path: str | os.PathLike, *, all_ranks: bool = False) -> None:
    """``torch.save`` atomically; rank 0 only under torch.distributed."""
    _atomic_write(path, lambda tmp: torch.save(obj, tmp), all_ranks)


@contextmanager
def staged_folder(folder: str | os.PathLike, last: Iterable[str] = ()) -> Iterator[Path]:
    """A temporary sibling of ``folder`` (``.<name>.partial-<random>``) to write a run's
    files into, so that a run that fails leaves no half-written folder.

    When the block ends without an exception the staged files move into ``folder``: a
    missing ``folder`` is the staged one renamed (one atomic step); into an existing one
    each file replaces the file of its name (other files stay), the top-level entries
    named in ``last`` after the others. When the block raises, the staged folder is
    removed and ``folder`` is left as it was. Needs write permission on ``folder``'s
    parent; a killed process leaves the hidden sibling behind.
    """
    folder = Path(folder)
    staging = folder.with_name(f".{folder.name}.partial-{uuid.uuid4().hex[:12]}")
    staging.mkdir()
    try:
        yield staging
        if folder.exists():
            _move_into(staging, folder, frozenset(last))
        else:
            os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into(source: Path, target: Path, last: frozenset[str] = frozenset()) -> None:
    """Move the entries of ``source`` into the folder ``target``: files replace files of
    their name, folders merge into folders of their name; the names in ``last`` last."""
    for entry in sorted(source.iterdir(), key=lambda p: p.name in last):
        destination = target / entry.name
        if entry.is_dir() and destination.is_dir():
            _move_into(entry, destination)
        else:
            os.replace(entry, destination)


def check_payload(payload: Any, fmt: str, version: int, source: object, wrong: str) -> Mapping:
    """Check the ``{"format": fmt, "version": v, ...}`` header of a file the package wrote.

    Raises ValueError with the message ``wrong`` when ``payload`` is not such a dict, and
    one naming ``source`` when its version is newer than ``version`` (a newer bnnconvert
    wrote it). Returns ``payload``.
    """
    if not isinstance(payload, Mapping) or payload.get("format") != fmt:
        raise ValueError(wrong)
    if payload.get("version", 0) > version:
        raise ValueError(
            f"{source} was written by a newer bnnconvert ({payload.get('bnnconvert_version')}, "
            f"{fmt} format {payload.get('version')}); upgrade bnnconvert to read it"
        )
    return payload


def load_payload(path: str | os.PathLike, fmt: str, version: int, wrong: str) -> Mapping:
    """``torch.load(path, weights_only=True)`` of a file the package wrote (no code is
    unpickled), its header checked by :func:`check_payload`; ValueError with the message
    ``wrong`` (and the reason) when it cannot be read or is not a ``fmt`` file."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types on foreign bytes
        raise ValueError(f"{wrong} (torch.load failed with {type(exc).__name__})") from None
    return check_payload(payload, fmt, version, path, wrong)


# ----------------------------------------------------------------------- arguments
def check_positive_int(**values: Any) -> None:
    """Check that each keyword argument is an integer >= 1 (a Python or numpy integer,
    not a bool): TypeError naming it for another type, ValueError for a value < 1."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be a positive integer, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) as None, mappings and sequences
    walked, keys as strings and any other non-JSON value as its ``str``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def resolve_factory(spec: str, what: str = "architecture") -> Callable[..., Any]:
    """The callable named by ``"package.module:factory"`` (``factory`` may be dotted).

    Raises ValueError when the spec is malformed, its module does not import or it has no
    such callable attribute; ``what`` names the spec in the message.
    """
    if not isinstance(spec, str) or not FACTORY_SPEC.match(spec):
        raise ValueError(
            f"bad {what} spec {spec!r}; use 'package.module:factory', "
            "e.g. torchvision.models:resnet18 or bnnconvert.models:UNet"
        )
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"cannot import module {module_name!r} of {what} {spec!r} ({exc}); check the "
            "spelling and that the package is installed (or on PYTHONPATH)"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(
                f"module {module_name!r} has no {attr!r} ({what} {spec!r}); check the "
                "name after the colon"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{what} {spec!r} is not callable; name a factory or a class")
    return obj


# ----------------------------------------------------------------------- models and batches
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch.device that ``device`` names; ``"auto"``: CUDA when available, else the CPU.

    Raises ValueError for a name torch does not know (``"gpu"``) and for a CUDA device that
    this machine does not have (no CUDA, or an index beyond the visible GPUs), so that a
    wrong device fails before any work, not deep inside the first forward.
    """
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a string or torch.device, got {type(device).__name__}")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"unknown device {device!r}; use 'auto' (CUDA when available, else the CPU), "
            "'cpu', 'cuda' or 'cuda:N'"
        ) from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"device {device!r} needs a CUDA GPU, and torch sees none here; "
                "use 'auto' (CUDA when available, else the CPU) or 'cpu'"
            )
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(
                f"device {device!r}: this machine has {count} CUDA GPU(s), "
                f"numbered 0 to {count - 1}"
            )
    return resolved


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter (or buffer); None if it has neither."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return None if tensor is None else tensor.device


Inputs = Tensor | Mapping[str, Tensor]
"""What a model is called with: one positional tensor (N, ...), or keyword tensors
{argument name: (N, ...)}, called as ``model(**inputs)`` (see :func:`call_model`)."""


@dataclass(frozen=True)
class BatchFormat:
    """How to read batches and model outputs: the one adapter that every function
    consuming data takes as ``batch_format=`` (None: the default ``BatchFormat()``).

    Batches may be input tensors (N, ...), (input, target, ...) sequences, or mappings
    such as MONAI's ``{"image": ..., "label": ...}`` or Hugging Face's
    ``{"pixel_values": ..., "labels": ...}``. Models may return a tensor, an object with
    ``.logits`` (a Hugging Face ``ModelOutput`` or any dataclass), a mapping with a
    ``"logits"`` entry, or a tuple or list whose first item is the logits.

    Attributes:
        input_key: for mapping batches, the key of the input, passed positionally
            (``model(batch[key])``), or a list of keys passed as keyword arguments
            (``model(**{k: batch[k] for k in keys})``, e.g. ``["pixel_values"]``). None:
            mapping batches are refused. Tensor and sequence batches are read as
            (input, target, ...) whatever the keys; a one-key list names the keyword of
            their input.
        target_key: the key of the target in mapping batches (None: no target). Where no
            target is needed (prediction), a batch without it has none.
        output_fn: model output -> logits tensor (N, C, ...); None: the output itself if
            it is a tensor, else its ``.logits``, its ``["logits"]``, or its first item if
            it is a tuple or list, in that order.

    Raises TypeError for keys or an ``output_fn`` of the wrong type.
    """

    input_key: str | Sequence[str] | None = None
    target_key: str | None = None
    output_fn: Callable[[Any], Tensor] | None = None

    def __post_init__(self) -> None:
        key = self.input_key
        if isinstance(key, (list, tuple)):
            if not key or not all(isinstance(k, str) for k in key):
                raise TypeError(f"input_key must be a key or a non-empty list of keys, got {key!r}")
            object.__setattr__(self, "input_key", tuple(key))
        elif key is not None and not isinstance(key, str):
            raise TypeError(f"input_key must be a key or a list of keys, got {key!r}")
        if self.target_key is not None and not isinstance(self.target_key, str):
            raise TypeError(f"target_key must be a key (a string), got {self.target_key!r}")
        if self.output_fn is not None and not callable(self.output_fn):
            raise TypeError(
                f"output_fn must be a function (model output -> logits tensor), got "
                f"{type(self.output_fn).__name__}"
            )

    @property
    def keywords(self) -> bool:
        """True when the inputs are passed as keyword arguments (``input_key`` a list)."""
        return isinstance(self.input_key, tuple)

    def split(
        self, batch: Any, device: torch.device | str | None = None, *, need_target: bool = False
    ) -> tuple[Inputs, Tensor | None]:
        """(inputs, target or None) of one batch, both moved to ``device`` if given.

        Raises TypeError for a batch it cannot read and, with ``need_target``, for one
        without a target; ValueError for a key the batch lacks (the target key only
        with ``need_target``).
        """
        if isinstance(batch, Mapping):
            x, target = self._split_mapping(batch, need_target)
        else:
            x, target = _split_sequence(batch)
            if self.keywords:
                if len(self.input_key) != 1:
                    raise TypeError(
                        f"input_key={list(self.input_key)} reads several inputs from mapping "
                        f"batches; got a batch of type {type(batch).__name__}"
                    )
                x = {self.input_key[0]: x}
        if need_target and target is None:
            raise TypeError(
                "each batch must be an (input, target) pair, e.g. from a DataLoader over a "
                f"TensorDataset, or a mapping read with target_key=...; got {type(batch).__name__}"
            )
        if device is not None:
            x = move_inputs(x, device)
            target = None if target is None else target.to(device, non_blocking=True)
        return x, target

    def _split_mapping(self, batch: Mapping, need_target: bool) -> tuple[Inputs, Tensor | None]:
        if self.input_key is None:
            raise TypeError(
                f"cannot read a batch of type {type(batch).__name__} with keys "
                f"{_keys(batch)}: expected a tensor or an (input, target) pair, or pass "
                "input_key=... (and target_key=...) naming the mapping's input and target"
            )
        if self.keywords:
            x: Inputs = {k: _entry(batch, k, "input_key") for k in self.input_key}
        else:
            x = _entry(batch, self.input_key, "input_key")
        target = None
        if self.target_key is not None and (need_target or self.target_key in batch):
            target = _entry(batch, self.target_key, "target_key")
        return x, target

    def output(self, out: Any) -> Tensor:
        """The logits tensor of a model output (see ``output_fn``); TypeError if there is
        none."""
        if self.output_fn is not None:
            value = self.output_fn(out)
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"output_fn returned {type(value).__name__}, not a tensor; make it return "
                    "the logits tensor (N, C, ...) of the model's output"
                )
            return value
        return _default_output(out)

    def forward(self, model: nn.Module, inputs: Inputs) -> Tensor:
        """``model`` called on ``inputs`` (:func:`call_model`), its logits read by
        :meth:`output`."""
        return self.output(call_model(model, inputs))


def as_batch_format(batch_format: BatchFormat | None) -> BatchFormat:
    """``batch_format``, or the default ``BatchFormat()`` for None; TypeError otherwise."""
    if batch_format is None:
        return _DEFAULT_FORMAT
    if not isinstance(batch_format, BatchFormat):
        raise TypeError(
            f"batch_format must be a BatchFormat, got {type(batch_format).__name__}; build one "
            "with BatchFormat(input_key=..., target_key=..., output_fn=...)"
        )
    return batch_format


_DEFAULT_FORMAT = BatchFormat()


def _keys(batch: Mapping) -> list:
    return sorted(map(str, batch))


def _entry(batch: Mapping, key: str, argument: str) -> Tensor:
    if key not in batch:
        raise ValueError(
            f"{argument} {key!r} is not a key of the batch (keys: {_keys(batch)}); pass "
            f"{argument}=... naming one of them"
        )
    value = batch[key]
    if not isinstance(value, Tensor):
        raise TypeError(
            f"batch[{key!r}] ({argument}) is a {type(value).__name__}, not a tensor; collate "
            "the batches into tensors (e.g. with a DataLoader)"
        )
    return value


def _split_sequence(batch: Any) -> tuple[Tensor, Tensor | None]:
    """(input, target or None) of a tensor or an (input, target, ...) sequence."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        target = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], target
    raise TypeError(
        f"cannot read a batch of type {type(batch).__name__}: expected a tensor, an "
        "(input, target) pair of tensors, or a mapping read with input_key=... and "
        "target_key=..."
    )


def _default_output(out: Any) -> Tensor:
    """The output itself, its ``.logits``, its ``["logits"]`` or its first item."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    what = f" with keys {_keys(out)}" if isinstance(out, Mapping) else ""
    raise TypeError(
        f"cannot read logits from a model output of type {type(out).__name__}{what}: "
        "expected a tensor, an object with a .logits tensor, a mapping with a 'logits' "
        "tensor, or a tuple whose first item is a tensor; pass output_fn=a function "
        "(output -> logits tensor), e.g. output_fn=lambda out: out['seg']"
    )


def call_arguments(inputs: Inputs) -> tuple[tuple, dict[str, Tensor]]:
    """(args, kwargs) of a call on ``inputs``: ((), inputs) for keyword inputs, else
    ((inputs,), {})."""
    return ((), dict(inputs)) if isinstance(inputs, Mapping) else ((inputs,), {})


def call_model(model: Callable[..., Any], inputs: Inputs) -> Any:
    """``model(**inputs)`` for keyword inputs, else ``model(inputs)``."""
    args, kwargs = call_arguments(inputs)
    return model(*args, **kwargs)


def batch_length(inputs: Inputs) -> int:
    """N, the batch size of ``inputs`` (of its first tensor for keyword inputs)."""
    if isinstance(inputs, Mapping):
        return next(iter(inputs.values())).shape[0]
    return inputs.shape[0]


def inputs_device(inputs: Inputs) -> torch.device:
    """Where ``inputs`` are (their first tensor for keyword inputs)."""
    if isinstance(inputs, Mapping):
        return next(iter(inputs.values())).device
    return inputs.device


def move_inputs(inputs: Inputs, device: torch.device | str) -> Inputs:
    """``inputs`` on ``device`` (every tensor of keyword inputs)."""
    if isinstance(inputs, Mapping):
        return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    return inputs.to(device, non_blocking=True)


def chunk_inputs(inputs: Inputs, size: int) -> list[Inputs]:
    """``inputs`` split along N into chunks of ``size`` items (the last may be smaller)."""
    if isinstance(inputs, Mapping):
        parts = {k: v.split(size) for k, v in inputs.items()}
        return [dict(zip(parts, chunk)) for chunk in zip(*parts.values())]
    return list(inputs.split(size))


@dataclass(frozen=True)
class TupleCollate:
    """A DataLoader ``collate_fn`` giving (input, target) tuples, or (input,) without a
    target, of mapping items: ``collate`` (None: the items are already a batch), then
    ``batch_format.split``. Picklable (for worker processes) when ``collate`` is."""

    batch_format: BatchFormat
    collate: Callable[[Any], Any] | None = None

    def __call__(self, items: Any) -> tuple[Tensor, ...]:
        batch = items if self.collate is None else self.collate(items)
        x, target = self.batch_format.split(batch)
        return (x,) if target is None else (x, target)


class _TupleBatches:
    """An iterable's batches read by a :class:`TupleCollate` (its length kept)."""

    def __init__(self, data: Iterable, read: TupleCollate) -> None:
        self.data, self.read = data, read

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        return map(self.read, self.data)

    def __len__(self) -> int:
        return len(self.data)  # a TypeError for an iterable without a length, as len()


def tuple_batches(data: Iterable, batch_format: BatchFormat) -> Iterable:
    """``data`` yielding (input, target) tuples read by ``batch_format`` (a positional
    ``input_key``): for code that takes tuple batches, such as the command line's
    ``--input-key``/``--target-key``. A DataLoader is kept (its sampler, generator,
    workers, dataset and length) with its ``collate_fn`` wrapped in place; any other
    iterable is read batch by batch.

    Raises ValueError for keyword inputs (a list of keys): a tuple has no keywords.
    """
    if batch_format.keywords:
        raise ValueError(
            f"input_key={list(batch_format.input_key)} passes keyword inputs, which tuple "
            "batches cannot carry; pass one key, or the mapping batches with batch_format=..."
        )
    if isinstance(data, DataLoader):
        data.collate_fn = TupleCollate(batch_format, data.collate_fn)
        return data
    return _TupleBatches(data, TupleCollate(batch_format))


def split_batch(
    batch: Any,
    device: torch.device | str | None = None,
    *,
    need_target: bool = False,
    batch_format: BatchFormat | None = None,
) -> tuple[Inputs, Tensor | None]:
    """(inputs, target or None) of a batch, read by ``batch_format``
    (:meth:`BatchFormat.split`).

    Args:
        batch: an input tensor (N, ...), a tuple/list whose first item is the input and
            whose second (if a tensor) is the target, or a mapping read with the keys of
            ``batch_format``.
        device: where to move both (None: leave them where they are).
        need_target: raise TypeError unless the batch holds a target (training).
        batch_format: a :class:`BatchFormat`; None: tensors and sequences only.
    """
    return as_batch_format(batch_format).split(batch, device, need_target=need_target)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode within the block; each module's own training flag restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
