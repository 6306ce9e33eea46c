"""Saving and loading models: user checkpoints, the converted-model file, architecture specs.

User checkpoints (:func:`load_checkpoint`):

- a state_dict (a ``torch.save`` file or a ``.safetensors`` file), or a checkpoint dict
  holding one under ``"state_dict"`` (Lightning), ``"model_state_dict"``, ``"model"`` or
  ``"net"``, together with an architecture spec ``"package.module:factory"`` (e.g.
  ``"torchvision.models:resnet18"``), ``"timm:<model name>"`` or
  ``"torchvision:<model name>"`` (see :func:`resolve_arch`) and its keyword arguments. A
  common key prefix (Lightning's ``"model."``, DataParallel's ``"module."``, torch.compile's
  ``"_orig_mod."``) is found by matching the architecture's own keys and stripped. Read
  with ``torch.load(weights_only=True)`` or safetensors: no code is unpickled.
- a whole module saved with ``torch.save(model)``. Reading it means unpickling, which can
  run arbitrary code, so it is refused unless ``trust_pickle=True``.
- a TorchScript file (``torch.jit.save``): its weights are loaded into the architecture
  given by ``arch``. A ScriptModule itself cannot be converted (its layers are compiled
  code, not ``nn.Linear``/``nn.Conv*`` objects), so without ``arch`` it is refused.

Instead of ``arch``, both :func:`load_checkpoint` and :func:`load` take ``model=instance``:
the user's own, freshly built instance (e.g. of a class defined in a notebook, which no
``package.module:factory`` spec can name). The file's weights are loaded into it strictly,
in place, after re-applying a stored conversion to it.

Converted models (:func:`save` / :func:`load`) are one file in one of two formats, both
free of pickle. ``save(format=None)`` picks safetensors for a path ending in
``.safetensors`` and torch otherwise (``format="safetensors"`` fits any name,
``format="torch"`` refuses a ``.safetensors`` name); the readers take a file as
safetensors by its ``.safetensors`` suffix or by its content.

- torch: readable with ``torch.load(weights_only=True)``: plain dicts, lists, strings,
  numbers and tensors::

    {"format": "bnnconvert.model", "version": 1, "bnnconvert_version": "0.1.0",
     "torch_version": "...", "arch": "pkg.mod:factory" | None, "arch_kwargs": {...},
     "info": {criterion, r_bayes, prior_mu, prior_sigma, rho_init, ...} | None,
     "bayesian": {layer name: ["weight", "bias"]},   # the converted tensors per layer
     "state_dict": {...}}   # mu under the original keys, <name>_rho, <name>_idx, bayes_prior

- safetensors: the ``state_dict`` as the file's tensors; every other entry of the dict
  above as one JSON object in the header metadata under the key ``"bnnconvert"`` (beside
  ``"format": "pt"``, the convention of PyTorch safetensors files). JSON has no tuples: a
  tuple in ``arch_kwargs`` or ``info`` comes back as a list.

:func:`load` rebuilds the architecture from ``arch``, re-applies the conversion from the
stored ``<name>_idx`` buffers, and loads the state_dict strictly. A model remembers its
architecture spec in the attribute ``bnnconvert_arch`` (set by :func:`load_checkpoint`,
:func:`load` and :func:`build_model`; it survives ``convert`` and ``to_deterministic``).
"""

from __future__ import annotations

import ast
import difflib
import functools
import json
import logging
import os
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.serialization
from safetensors import safe_open
from torch import Tensor, nn

from ._utils import (
    atomic_torch_save,
    atomic_write_bytes,
    check_payload,
    first_line,
    resolve_factory,
)
from ._version import __version__
from .convert import INFO_ATTR, bayes_summary, num_bayesian, to_deterministic
from .kronecker import KRONECKER_BUFFERS
from .layers import (
    BayesianLayer,
    attach_owners,
    bayesian_layers,
    expect_kronecker,
    make_bayesian,
)
from .predict import PREDICTIVES, apply_predictive
from .saliency import FORMAT as SALIENCY_FORMAT

__all__ = [
    "ARCH_ATTR",
    "SAFETENSORS_KEY",
    "SAVE_FORMATS",
    "build_model",
    "describe",
    "load",
    "load_checkpoint",
    "load_state_strict",
    "parse_arch_kwargs",
    "remember_arch",
    "resolve_arch",
    "save",
    "strip_prefix",
]

log = logging.getLogger(__name__)

FORMAT = "bnnconvert.model"
FORMAT_VERSION = 1
ARCH_ATTR = "bnnconvert_arch"
"""Attribute of a model's root: ``{"arch": "pkg.mod:factory", "kwargs": {...}}``."""

SAVE_FORMATS = ("torch", "safetensors")
"""The file formats of :func:`save`."""
SAFETENSORS_KEY = "bnnconvert"
"""The key of a converted model's JSON header in a safetensors file's metadata."""

_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net")
_PICKLE_WHY = "unpickling can run arbitrary code, so do this only for files from a source you trust"
_ARCH_FIX = "check arch=... and arch_kwargs=... (e.g. num_classes, in_channels)"
_MODEL_FIX = (
    "check that model=... is built like the saved model (the same class and constructor "
    "arguments, e.g. num_classes, in_channels)"
)


# ----------------------------------------------------------------------- architectures
def build_model(arch: str, arch_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """The model an architecture spec names, built with ``arch_kwargs``; it remembers its
    spec (attribute ``bnnconvert_arch``).

    ``arch`` is ``"package.module:factory"`` (``factory(**arch_kwargs)``),
    ``"timm:<model name>"`` (``timm.create_model(name, pretrained=False, **arch_kwargs)``)
    or ``"torchvision:<model name>"`` (``torchvision.models.get_model(name, weights=None,
    **arch_kwargs)``): see :func:`resolve_arch`. timm's ``pretrained`` is not remembered
    (it only fills in weights, which a loaded file replaces), so a saved timm model loads
    without its pretrained weights.
    """
    kwargs = _plain(dict(arch_kwargs or {}), "arch_kwargs")
    factory = resolve_arch(arch)
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise ValueError(
            f"{arch}({_kwargs_text(kwargs)}) failed: {exc}; check arch_kwargs=..."
        ) from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{arch} returned {type(model).__name__}, not a torch.nn.Module")
    if _zoo_of(arch)[0] == "timm":
        kwargs.pop("pretrained", None)
    remember_arch(model, arch, kwargs)
    return model


_ZOO_LIBRARIES = ("timm", "torchvision")
"""The model libraries an architecture spec ``"<library>:<model name>"`` names models of."""


def resolve_arch(spec: str) -> Callable[..., nn.Module]:
    """The factory an architecture spec names; it takes the keyword arguments of the model.

    - ``"package.module:factory"``: that callable (e.g. ``"bnnconvert.models:UNet"``).
    - ``"timm:<model name>"`` (e.g. ``"timm:resnet18"``, ``"timm:convnext_atto"``):
      ``timm.create_model(name, pretrained=False, **kwargs)``; ``pretrained=True`` in the
      keyword arguments reads timm's pretrained weights (from the Hugging Face cache, or
      downloads them).
    - ``"torchvision:<model name>"`` (e.g. ``"torchvision:mobilenet_v3_small"``):
      ``torchvision.models.get_model(name, weights=None, **kwargs)``; ``weights="DEFAULT"``
      reads torchvision's weights (from the torch hub cache, or downloads them).

    Raises ValueError when the spec is malformed, its module or library is not installed
    (naming what to install), or it names no callable or no known model (listing close
    matches).
    """
    library, name = _zoo_of(spec)
    if library is None:
        return resolve_factory(spec)
    if library == "timm":
        timm = _import_timm()
        known, names, build = timm.is_model(name), timm.list_models, _timm_model
    else:
        import torchvision.models

        names, build = torchvision.models.list_models, _torchvision_model
        known = name.lower() in names()
    if not known:
        close = difflib.get_close_matches(name.lower(), names(), n=5, cutoff=0.6)
        hint = f"close matches: {', '.join(close)}" if close else "no close match"
        lister = "timm.list_models()" if library == "timm" else "torchvision.models.list_models()"
        raise ValueError(
            f"unknown {library} model {name!r} in architecture {spec!r} ({hint}); {lister} "
            "lists the names"
        )
    return functools.partial(build, name)


def _zoo_of(spec: Any) -> tuple[str | None, str]:
    """``("timm" | "torchvision", model name)`` for a model-library spec, else ``(None, "")``."""
    library, sep, name = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    return (library, name.strip()) if sep and library in _ZOO_LIBRARIES else (None, "")


def _import_timm() -> Any:
    """The timm module; ValueError naming the extra to install when it is missing."""
    try:
        import timm
    except ImportError:
        raise ValueError(
            "architecture 'timm:...' needs timm, which is not installed; install it with "
            "pip install 'bnnconvert[timm]' (or pip install timm)"
        ) from None
    return timm


def _timm_model(name: str, **kwargs: Any) -> nn.Module:
    import timm

    return timm.create_model(name, **{"pretrained": False, **kwargs})


def _torchvision_model(name: str, **kwargs: Any) -> nn.Module:
    import torchvision.models

    return torchvision.models.get_model(name, **{"weights": None, **kwargs})


def parse_arch_kwargs(text: str | None) -> dict[str, Any]:
    """``"num_classes=14,in_channels=1"`` -> ``{"num_classes": 14, "in_channels": 1}``.

    Values are Python literals read with :func:`ast.literal_eval` (numbers, strings, True,
    None, tuples such as ``size=(28, 28)``, lists, dicts); a bare word is taken as a string
    (``norm=batch``). A dict literal ``{"num_classes": 14}`` is accepted too. Nothing is
    executed.
    """
    text = (text or "").strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = None
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ValueError(f"bad arch_kwargs text {text!r}: expected a dict of name: literal")
        return value
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError:
        call = None
    if (
        not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name))
        or call.args
        or any(kw.arg is None for kw in call.keywords)
    ):
        raise ValueError(
            f"bad arch_kwargs text {text!r}; use comma-separated name=value pairs with Python "
            "literal values, e.g. num_classes=14,in_channels=1"
        )
    return {kw.arg: _literal(kw.value, kw.arg, text) for kw in call.keywords}


def _literal(node: ast.expr, name: str, text: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        if isinstance(node, ast.Name):
            return node.id
        raise ValueError(
            f"bad arch_kwargs text {text!r}: the value of {name!r} is not a literal (a number, a "
            "string, True/False/None, a tuple or list of those)"
        ) from None


def _kwargs_text(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _plain(value: Any, where: str) -> Any:
    """``value`` as exact builtin types (dict/list/tuple/str/int/float/bool/None), which
    ``torch.load(weights_only=True)`` reads; subclasses (numpy scalars, TorchVersion) are
    converted. Raises TypeError naming ``where`` for anything else."""
    if value is None or isinstance(value, bool):
        return value
    for kind in (int, float, str):
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has a non-string key {k!r}; use string keys")
            out[str(k)] = _plain(v, f"{where}[{k!r}]")
        return out
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy/torch scalar
        return _plain(value.item(), where)
    raise TypeError(
        f"{where} holds a {type(value).__name__}; only numbers, strings, booleans, None and "
        "lists/tuples/dicts of those can be stored"
    )


def remember_arch(model: nn.Module, arch: str | None, kwargs: Mapping[str, Any] | None) -> None:
    """Record ``arch`` and its ``kwargs`` on ``model`` (attribute ``bnnconvert_arch``) so
    that :func:`save` writes them; nothing for ``arch=None``."""
    if arch is not None:
        setattr(model, ARCH_ATTR, {"arch": arch, "kwargs": dict(kwargs or {})})


def _arch_of(model: nn.Module) -> tuple[str | None, dict[str, Any]]:
    stored = getattr(model, ARCH_ATTR, None) or {}
    return stored.get("arch"), dict(stored.get("kwargs") or {})


# ----------------------------------------------------------------------- reading files
def _read(path: Path, trust_pickle: bool) -> Any:
    """torch.load safely; TorchScript files come back as ScriptModules."""
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; pass a checkpoint file written by torch.save")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty, not a checkpoint; was it written completely?")
    if _is_safetensors(path):
        return _read_safetensors(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return _read_torchscript(path)
        if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            raise ValueError(f"{path} is a zip archive but not a PyTorch checkpoint")
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if unsafe and not trust_pickle:
            raise _pickle_refused(path, unsafe)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:  # torch raises many types on foreign bytes
        if "Unsupported global" in str(exc) and not trust_pickle:
            raise _pickle_refused(path, []) from None
        raise ValueError(
            f"{path} is not a PyTorch checkpoint (torch.load failed with "
            f"{type(exc).__name__}); pass a file written by torch.save or torch.jit.save"
        ) from None


def _is_safetensors(path: Path) -> bool:
    """A ``.safetensors`` suffix, or content that starts like one: an 8-byte little-endian
    header length that fits the file, then the header's JSON ``{``."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as handle:
        head = handle.read(9)
    size = int.from_bytes(head[:8], "little")
    return len(head) == 9 and head[8:] == b"{" and size <= path.stat().st_size - 8


def _read_safetensors(path: Path) -> dict[str, Any]:
    """The tensors of a safetensors file, or the payload of a file :func:`save` wrote in
    that format (its JSON header with the tensors as ``"state_dict"``). No pickle."""
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error type, OSError, ...
        raise ValueError(
            f"{path} is not a readable safetensors file ({first_line(exc)}); was it written "
            "completely?"
        ) from None
    if SAFETENSORS_KEY not in metadata:
        return tensors
    try:
        header = json.loads(metadata[SAFETENSORS_KEY])
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict):
        raise ValueError(
            f"{path}: the {SAFETENSORS_KEY!r} metadata of this safetensors file is not a JSON "
            "object; the file is damaged, save the model again"
        )
    return {**header, "state_dict": tensors}


def _pickle_refused(path: Path, unsafe: list[str]) -> ValueError:
    what = f" (it holds {', '.join(unsafe[:3])}{', ...' if len(unsafe) > 3 else ''})"
    return ValueError(
        f"{path} is a pickled Python object, not plain weights{what if unsafe else ''}; "
        f"loading it needs trust_pickle=True: {_PICKLE_WHY}. Safer: save "
        "model.state_dict() and pass arch=..."
    )


def _read_torchscript(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise ValueError(
                f"{path} looks like TorchScript but torch.jit.load failed: {first_line(exc)}"
            ) from None


def _find_state_dict(obj: Mapping, path: Path) -> dict[str, Tensor] | None:
    """The state_dict in a checkpoint dict, or None if ``obj`` holds none."""
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        return dict(obj)
    for key in _STATE_KEYS:
        inner = obj.get(key)
        if (
            isinstance(inner, Mapping)
            and inner
            and all(isinstance(v, Tensor) for v in inner.values())
        ):
            log.info("%s: using the state_dict under %r", path, key)
            return dict(inner)
    return None


# ----------------------------------------------------------------------- state_dict fitting
def strip_prefix(state: Mapping[str, Tensor], expected: Iterable[str]) -> dict[str, Tensor]:
    """The entries of ``state`` under the key prefix that best matches ``expected`` keys,
    with that prefix removed (e.g. Lightning's ``"model."``); ``state`` itself if no
    prefix matches better than none."""
    expected = set(expected)
    counts: Counter[str] = Counter()
    for key in state:
        for i, char in enumerate(key):
            if char == "." and key[i + 1 :] in expected:
                counts[key[: i + 1]] += 1
        if key in expected:
            counts[""] += 1
    if not counts:
        return dict(state)
    best = max(counts.values())
    prefix = min((p for p, c in counts.items() if c == best), key=len)
    if prefix:
        log.info("stripping the key prefix %r (%d of %d keys match)", prefix, best, len(state))
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_state_strict(
    model: nn.Module, state: Mapping[str, Tensor], source: str, fix: str = _ARCH_FIX
) -> None:
    """``model.load_state_dict(state, strict=True)`` with a one-line error naming the
    missing, unexpected and mis-shaped keys (up to 3 of each) and ``fix``, what to do."""
    _check_state_fits(model, state, source, fix)
    model.load_state_dict(state, strict=True)


def _check_state_fits(
    model: nn.Module,
    state: Mapping[str, Tensor],
    source: str,
    fix: str = _ARCH_FIX,
    *,
    allow_unknown: bool = False,
) -> None:
    """Raise the ValueError of :func:`load_state_strict` unless ``state`` has every key of
    ``model.state_dict()`` with the same shape and (unless ``allow_unknown``) no other."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [] if allow_unknown else [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    problems = []
    if shapes:
        examples = ", ".join(
            f"{k!r}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
            for k in shapes[:3]
        )
        problems.append(f"{len(shapes)} tensors differ in shape (e.g. {examples})")
    if missing:
        problems.append(f"{len(missing)} model tensors are missing (e.g. {_names(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} file tensors are unknown (e.g. {_names(unexpected)})")
    if problems:
        raise ValueError(f"{source} does not fit the architecture: {'; '.join(problems)}; {fix}")


def _names(keys: list[str]) -> str:
    return ", ".join(map(repr, keys[:3]))


def _arch_label(arch: str, kwargs: Mapping[str, Any]) -> str:
    return f"{arch}({_kwargs_text(kwargs)})"


def _model_label(model: nn.Module) -> str:
    return f"model={type(model).__name__}(...)"


def _check_target(
    arch: str | None, arch_kwargs: Mapping[str, Any] | None, model: nn.Module | None
) -> None:
    """Refuse ``model`` beside ``arch``/``arch_kwargs``, a non-module, a converted one."""
    if model is None:
        return
    if arch is not None or arch_kwargs is not None:
        raise ValueError(
            "pass either arch=... (and arch_kwargs=...) to build the architecture or "
            "model=... to load into your own instance, not both"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module instance, got {type(model).__name__}")
    if any(True for _ in bayesian_layers(model)):
        raise ValueError(
            "model=... is already converted; pass a freshly built instance of the original "
            "architecture (bnnconvert.to_deterministic(model) gives one)"
        )


def _model_from_state(
    state: Mapping[str, Tensor],
    path: Path,
    arch: str | None,
    kwargs: Mapping[str, Any] | None,
    model: nn.Module | None,
) -> nn.Module:
    if model is not None:
        source, fix = f"{path} for {_model_label(model)}", _MODEL_FIX
    elif arch is None:
        raise ValueError(
            f"{path} holds a state_dict ({len(state)} tensors) but no architecture; pass "
            "arch=... ('package.module:factory', e.g. 'torchvision.models:resnet18') and "
            "arch_kwargs=... (e.g. num_classes=14), or from Python model=... (an instance of "
            "your class)"
        )
    else:
        model = build_model(arch, kwargs)
        source, fix = f"{path} for {_arch_label(arch, kwargs or {})}", _ARCH_FIX
    state = strip_prefix(state, model.state_dict().keys())
    load_state_strict(model, state, source, fix)
    return model


# ----------------------------------------------------------------------- public loading
def load_checkpoint(
    path: str | os.PathLike,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    *,
    model: nn.Module | None = None,
    trust_pickle: bool = False,
) -> nn.Module:
    """Load a model from whatever a user has on disk (see the module docstring).

    Args:
        path: a state_dict / checkpoint dict file (``torch.save`` or ``.safetensors``), a
            torch.save'd module, a TorchScript file or a file written by :func:`save`.
        arch: ``"package.module:factory"`` building the architecture; needed for state_dicts
            and TorchScript files (unless ``model`` is given), optional otherwise (then
            remembered for :func:`save`).
        arch_kwargs: keyword arguments of the factory, e.g. ``{"num_classes": 14}``.
        model: instead of ``arch``, a freshly built instance of your own class to load the
            weights into (strictly, in place; a stored conversion is re-applied to it).
        trust_pickle: allow unpickling a whole module (can run arbitrary code).

    Returns the model on the CPU (``model`` itself, on its device, when given), with its
    mode as stored (a freshly built one is in train mode). Raises FileNotFoundError,
    ValueError (TypeError for a ``model`` that is not a module) with a message naming the
    fix.
    """
    path = Path(path)
    _check_target(arch, arch_kwargs, model)
    obj = _read(path, trust_pickle)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        check_payload(obj, FORMAT, FORMAT_VERSION, path, "")
        return _rebuild(obj, path, False, arch, arch_kwargs, model)
    if isinstance(obj, Mapping) and obj.get("format") == SALIENCY_FORMAT:
        raise ValueError(f"{path} is a saliency file, not a model; pass the model checkpoint")
    if isinstance(obj, torch.jit.ScriptModule):
        if arch is None and model is None:
            raise ValueError(
                f"{path} is a TorchScript module, which cannot be converted (its layers are "
                "compiled code); pass arch=... (or from Python model=...) to load its weights "
                "into the Python architecture, or save model.state_dict() instead"
            )
        return _model_from_state(obj.state_dict(), path, arch, arch_kwargs, model)
    if isinstance(obj, nn.Module):
        return _pickled_module(obj, path, arch, arch_kwargs, model)
    if isinstance(obj, Mapping):
        state = _find_state_dict(obj, path)
        if state is not None:
            return _model_from_state(state, path, arch, arch_kwargs, model)
        if isinstance(obj.get("model"), nn.Module):
            return _pickled_module(obj["model"], path, arch, arch_kwargs, model)
        keys = ", ".join(map(repr, list(obj)[:6]))
        raise ValueError(
            f"{path} holds a dict without a state_dict (keys {keys}); save model.state_dict() "
            f"or a dict with one under {' / '.join(_STATE_KEYS)}"
        )
    raise ValueError(
        f"{path} holds a {type(obj).__name__}, not a model or a state_dict; save "
        "model.state_dict() (and pass arch=...) or the model itself"
    )


def _pickled_module(
    obj: nn.Module,
    path: Path,
    arch: str | None,
    arch_kwargs: Mapping[str, Any] | None,
    model: nn.Module | None,
) -> nn.Module:
    """A whole module read from ``path``; with ``model``, its weights loaded into that."""
    if model is not None:
        return _model_from_state(obj.state_dict(), path, None, None, model)
    remember_arch(obj, arch, arch_kwargs)
    return obj


def load(
    path: str | os.PathLike,
    deterministic: bool = False,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    model: nn.Module | None = None,
) -> nn.Module:
    """Load a model written by :func:`save`, in either format (no code is unpickled).

    Args:
        path: the file (torch or safetensors; told apart by content).
        deterministic: return the mu model (the original architecture, sigma dropped)
            instead of the partial Bayesian one.
        arch, arch_kwargs: the architecture, needed only when the file was saved without
            one; they override the stored spec.
        model: instead of ``arch``, a freshly built instance of the saved model's class
            (e.g. defined in a notebook): the conversion is re-applied to it from the
            stored indices and the weights are loaded into it strictly, in place.

    Returns the model in eval mode: on the CPU, or ``model`` itself on its device.
    Raises ValueError naming the mismatching keys and shapes when the file does not fit
    the architecture.
    """
    path = Path(path)
    _check_target(arch, arch_kwargs, model)
    obj = _read(path, trust_pickle=False)
    wrong = (
        f"{path} was not written by bnnconvert.save; load user checkpoints with "
        "bnnconvert.load_checkpoint(path, arch=...) or load_checkpoint(path, model=...)"
    )
    check_payload(obj, FORMAT, FORMAT_VERSION, path, wrong)
    return _rebuild(obj, path, deterministic, arch, arch_kwargs, model)


def _rebuild(
    payload: Mapping,
    path: Path,
    deterministic: bool,
    arch: str | None,
    arch_kwargs: Mapping[str, Any] | None,
    model: nn.Module | None,
) -> nn.Module:
    if model is not None:
        source, fix = f"{path} for {_model_label(model)}", _MODEL_FIX
    else:
        stored_arch, stored_kwargs = payload.get("arch"), payload.get("arch_kwargs") or {}
        if arch is None and stored_arch is None:
            raise ValueError(
                f"{path} was saved without an architecture spec; pass arch=... "
                "('package.module:factory') and arch_kwargs=..., or from Python model=... (an "
                "instance of your class), or save with bnnconvert.save(model, path, arch=...)"
            )
        spec = arch or stored_arch
        kwargs = dict(arch_kwargs) if arch_kwargs is not None else dict(stored_kwargs)
        model = build_model(spec, kwargs)
        source, fix = f"{path} for {_arch_label(spec, kwargs)}", _ARCH_FIX
    state = payload["state_dict"]
    # the plain tensors first (the model is not converted yet: rho, idx, ... are extra)
    _check_state_fits(model, state, source, fix, allow_unknown=True)
    try:
        _reapply_conversion(model, payload.get("bayesian") or {}, state, path, fix)
        load_state_strict(model, state, source, fix)
    except Exception:
        to_deterministic(model, inplace=True)  # leave a user's instance as it was
        raise
    if payload.get("info") is not None:
        setattr(model, INFO_ATTR, dict(payload["info"]))
        if payload["info"].get("predictive") in PREDICTIVES:
            apply_predictive(model, payload["info"]["predictive"])
    model.eval()
    if deterministic:
        to_deterministic(model, inplace=True)
    return model


def _reapply_conversion(
    model: nn.Module,
    layers: Mapping[str, list[str]],
    state: Mapping[str, Tensor],
    path: Path,
    fix: str = _ARCH_FIX,
) -> None:
    """Turn the stored Bayesian layers of a freshly built model into masked layers again;
    ``fix`` says what to do when the model does not fit the file."""
    modules = dict(model.named_modules())
    for layer_name, names in layers.items():
        if layer_name not in modules:
            raise ValueError(
                f"{path} has a Bayesian layer {layer_name!r} that the architecture lacks; {fix}"
            )
        module = modules[layer_name]
        masks = {n: _mask_from_state(module, layer_name, n, state, path, fix) for n in names}
        prior = state[_key(layer_name, "bayes_prior")]
        make_bayesian(module, masks, prior_mu=float(prior[0]), prior_sigma=float(prior[1]))
        if _key(layer_name, "kron_var") in state:  # a Kronecker-factored posterior
            stored = {k: state.get(_key(layer_name, k)) for k in KRONECKER_BUFFERS}
            expect_kronecker(module, stored)
    attach_owners(model)


def _key(layer: str, name: str) -> str:
    return f"{layer}.{name}" if layer else name


def _mask_from_state(
    module: nn.Module,
    layer: str,
    name: str,
    state: Mapping[str, Tensor],
    path: Path,
    fix: str = _ARCH_FIX,
) -> Tensor:
    """Bool mask of the parameter's shape (on its device) from the stored ``<name>_idx``
    (empty: dense)."""
    param = module._parameters.get(name)
    idx, rho = state.get(_key(layer, f"{name}_idx")), state.get(_key(layer, f"{name}_rho"))
    if param is None or idx is None or rho is None:
        raise ValueError(
            f"{path} is damaged or does not fit the architecture: no {name!r} mask for layer "
            f"{layer!r}; {fix}"
        )
    mask = torch.zeros(param.numel(), dtype=torch.bool, device=param.device)
    if idx.numel() == 0 and rho.numel() == param.numel():
        mask[:] = True
    elif idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= param.numel()):
        raise ValueError(
            f"{path}: indices of {_key(layer, name)!r} exceed its size "
            f"({param.numel()} entries); the file is damaged or {fix}"
        )
    else:
        mask[idx.long().to(param.device)] = True
    return mask.view(param.shape)


# ----------------------------------------------------------------------- saving
def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    format: str | None = None,
) -> None:
    """Write a (converted or plain) model atomically; see the module docstring for the formats.

    Args:
        model: a model from :func:`~bnnconvert.convert`, :func:`load`, training, or any
            plain model.
        path: the file; written to a temporary file beside it and renamed.
        arch: ``"package.module:factory"`` rebuilding the architecture, needed by
            :func:`load`. Default: the spec the model remembers (models from
            :func:`load_checkpoint` with an arch, :func:`build_model`, :func:`load`).
            Without one the file is written and :func:`load` then needs ``arch=`` or
            ``model=``.
        arch_kwargs: the factory's keyword arguments (default: the remembered ones).
        format: "torch" or "safetensors" (one file: the tensors, and the architecture spec,
            conversion info and Bayesian tensor list as JSON in its header metadata).
            Default: "safetensors" if ``path`` ends in ``.safetensors``, else "torch".
    """
    fmt = _save_format(path, format)
    stored_arch, stored_kwargs = _arch_of(model)
    spec = arch or stored_arch
    kwargs = _plain(dict(arch_kwargs) if arch_kwargs is not None else stored_kwargs, "arch_kwargs")
    if spec is not None:
        resolve_arch(spec)
    else:
        log.warning(
            "saving %s without an architecture spec; load() will need arch= or model=", path
        )
    info = getattr(model, INFO_ATTR, None)
    if info is not None:
        info = _plain(info, INFO_ATTR)
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "bnnconvert_version": str(__version__),
        "torch_version": str(torch.__version__),
        "arch": spec,
        "arch_kwargs": kwargs,
        "info": info,
        "bayesian": {name: list(layer.bayes_names) for name, layer in bayesian_layers(model)},
    }
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if fmt == "torch":
        atomic_torch_save({**header, "state_dict": state}, path)
    else:
        metadata = {"format": "pt", SAFETENSORS_KEY: json.dumps(header)}
        atomic_write_bytes(path, safetensors.torch.save(_own_storage(state), metadata))


def _save_format(path: str | os.PathLike, format: str | None) -> str:
    """The format of :func:`save`: ``format``, or by default from the suffix."""
    named = "safetensors" if Path(path).suffix == ".safetensors" else "torch"
    if format is None:
        return named
    if format not in SAVE_FORMATS:
        raise ValueError(f"format must be one of {', '.join(SAVE_FORMATS)} or None, got {format!r}")
    if format == "torch" and named == "safetensors":
        raise ValueError(
            f"{path}: a .safetensors name for a torch file would mislead every reader; use "
            "another suffix (e.g. .pt) or format='safetensors'"
        )
    return format


def _own_storage(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with each tensor contiguous and alone in its storage (safetensors refuses
    shared ones, e.g. tied weights): views and repeated storages are copied."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        storage = tensor.untyped_storage()
        alone = storage.nbytes() == tensor.numel() * tensor.element_size()
        if storage.data_ptr() in seen or not alone or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


# ----------------------------------------------------------------------- describing
def describe(model: nn.Module) -> dict[str, Any]:
    """Plain facts about a model for reports and ``bnnconvert info``.

    Returns {"class", "arch", "arch_kwargs", "parameters", "entries" (convertible weight and
    bias entries), "bayesian" (k), "bayesian_layers", "conversion" (settings or None)}.
    """
    arch, kwargs = _arch_of(model)
    summary = bayes_summary(model)
    return {
        "class": type(model).__name__,
        "arch": arch,
        "arch_kwargs": kwargs,
        "parameters": sum(p.numel() for p in model.parameters()),
        "entries": summary.entries,
        "bayesian": num_bayesian(model),
        "bayesian_layers": sum(1 for m in model.modules() if isinstance(m, BayesianLayer)),
        "conversion": dict(getattr(model, INFO_ATTR, None) or {}) or None,
    }
