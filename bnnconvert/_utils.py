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
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output_folder",
    "check_output_path",
    "check_payload",
    "check_positive_int",
    "first_line",
    "is_main_process",
    "json_safe",
    "load_payload",
    "model_device",
    "resolve_factory",
    "split_batch",
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
def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter (or buffer); None if it has neither."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return None if tensor is None else tensor.device


def split_batch(
    batch: Any, device: torch.device | str | None = None, *, need_target: bool = False
) -> tuple[Tensor, Tensor | None]:
    """(input, target or None) of a batch: a tensor, or a sequence (input, target, ...).

    Args:
        batch: an input tensor (N, ...), or a tuple/list whose first item is the input
            and whose second (if a tensor) is the target.
        device: where to move both (None: leave them where they are).
        need_target: raise TypeError unless the batch holds a target (training).
    """
    if isinstance(batch, Tensor):
        x, target = batch, None
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        x = batch[0]
        target = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
    else:
        raise TypeError(
            f"cannot read a batch of type {type(batch).__name__}: expected a tensor or an "
            "(input, target) pair of tensors; wrap other datasets to yield one of these"
        )
    if need_target and target is None:
        raise TypeError(
            "each batch must be an (input, target) pair, e.g. from a DataLoader over a "
            f"TensorDataset; got {type(batch).__name__}"
        )
    if device is not None:
        x = x.to(device, non_blocking=True)
        target = None if target is None else target.to(device, non_blocking=True)
    return x, target


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
