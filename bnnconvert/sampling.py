"""Monte Carlo forward passes: S posterior samples of a model's output, with hoisting.

``mc_outputs`` (stacked) and ``mc_samples`` (one output at a time, any output type) are
the entry points through which prediction and ELBO training draw samples. Where torch.fx
can trace the model, the part of the graph that no stochastic operation can influence (the
*prefix*) is computed once, and only the rest (the *suffix*) runs once per sample::

    x --prefix, once--> hoisted tensors --suffix, S times in order--> (S, *out)

Stochastic operations are Bayesian layers that sample, sampling owners, dropout and RReLU
modules in train mode, and the random tensor functions and methods (rand*, dropout with
training on, bernoulli, normal_, ...). A node belongs to the suffix when it is stochastic or
reads a suffix node. The prefix draws no random number and the suffix replays the original
node order sample after sample, so the draws happen in the plain loop's order: the samples
equal ``torch.stack([model(x) for _ in range(S)])`` under the same seed, bit for bit.

Training (ELBO): gradients flow, and autograd sums the S suffix branches' gradients into
the shared prefix, so the prefix runs forward and backward once per step (equal to the
plain loop's gradients up to float summation order). A BatchNorm layer of the prefix that
updates running statistics (train mode) runs once instead of S times; for that call its
momentum m becomes 1 - (1 - m)^S (cumulative average: S / (n + S)) and
num_batches_tracked advances by S, which reproduces the plain loop's S identical updates up
to rounding. Any other module with buffers in train mode, or a BatchNorm called more than
once per forward, runs per sample like a stochastic op.

Falls back to the plain loop (same results; the reason is logged once per model state)
when torch.fx cannot trace the model (data-dependent control flow, ...), when tracing drew
random numbers (a module samples outside the graph), when a traced-through module has
hooks that the graph would skip, when the forward mutates its input or a module tensor in
place, or when nothing can be hoisted (a stochastic op reads the input directly).
Randomness outside torch (Python's ``random``, numpy) is invisible to tracing: a forward
that uses it must be run with ``hoist=False``.

Inputs may be one tensor or keyword tensors (``model(**inputs)``, see
:class:`bnnconvert._utils.BatchFormat`); outputs may be any structure torch.fx can build
(a dataclass with ``.logits``, a dict, a tuple). Keyword inputs that the traced forward
cannot take run the plain loop.

The split graphs are cached per model (weakly), keyed by the identity, class, train flag,
sampling flag and hook presence of every submodule: converting, ``train()``/``eval()``,
``mean_weights()`` or replacing a layer re-plans on the next call.
"""

from __future__ import annotations

import inspect
import logging
import operator
import weakref
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from ._utils import BatchFormat, Inputs, as_batch_format, call_model, check_positive_int
from .layers import BayesianLayer, BayesianOwner, posterior_cache

__all__ = ["HoistPlan", "hoist_plan", "mc_outputs", "mc_samples"]

log = logging.getLogger(__name__)

_RANDOM_NAMES = frozenset(
    {
        "alpha_dropout", "bernoulli", "bernoulli_", "binomial", "cauchy_", "dropout",
        "dropout1d", "dropout2d", "dropout3d", "exponential_", "feature_alpha_dropout",
        "feature_dropout", "fused_dropout", "geometric_", "gumbel_softmax", "log_normal_",
        "multinomial", "native_dropout", "normal", "normal_", "poisson", "rand", "rand_like",
        "randint", "randint_like", "randn", "randn_like", "random_", "randperm", "rrelu",
        "rrelu_", "uniform_", "_sample_dirichlet", "_standard_gamma",
    }
)  # fmt: skip
"""Functions and tensor methods that draw random numbers (matched by name)."""

_VIEW_NAMES = frozenset(
    {
        "T", "as_strided", "chunk", "contiguous", "detach", "diagonal", "expand", "expand_as",
        "flatten", "getitem", "movedim", "moveaxis", "narrow", "permute", "reshape",
        "reshape_as", "select", "split", "split_with_sizes", "squeeze", "swapaxes",
        "swapdims", "t", "tensor_split", "transpose", "unbind", "unflatten", "unfold",
        "unsqueeze", "view", "view_as", "__getitem__",
    }
)  # fmt: skip
"""Ops whose output may alias their first argument (a mutation of one is seen by both)."""

_VIEW_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity)
_INPLACE_OPERATORS = frozenset(
    {
        operator.iadd, operator.iand, operator.ifloordiv, operator.ilshift, operator.imatmul,
        operator.imod, operator.imul, operator.ior, operator.ipow, operator.irshift,
        operator.isub, operator.itruediv, operator.ixor, operator.setitem,
    }
)  # fmt: skip
_CALLS = ("call_module", "call_function", "call_method")
_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)
"""Wrappers never traced (torch.compile's OptimizedModule is recognised by ``_orig_mod``)."""


# ------------------------------------------------------------------------ public
def mc_outputs(
    model: nn.Module,
    x: Inputs,
    samples: int,
    *,
    hoist: bool | None = None,
    batch_format: BatchFormat | None = None,
) -> Tensor:
    """Run ``samples`` stochastic forwards of ``model`` on ``x``.

    Args:
        model: any module (converted or not).
        x: the input batch, e.g. (N, C, H, W), or keyword inputs {name: (N, ...)}.
        samples: S >= 1.
        hoist: None (default) computes the deterministic prefix once where the model allows
            it and falls back to the plain loop otherwise; True does the same and logs the
            fallback reason at INFO level instead of DEBUG; False always runs the plain loop.
        batch_format: reads the logits of each output (its ``output_fn``); default: the
            output tensor, ``.logits``, ``["logits"]`` or a tuple's first item.

    Returns a tensor of shape (S, *logits_shape), sample s being the s-th forward of the
    plain loop under the same seed. Gradients flow when grad mode is on (usable in training).
    """
    fmt = as_batch_format(batch_format)
    return torch.stack([fmt.output(out) for out in mc_samples(model, x, samples, hoist=hoist)])


def mc_samples(
    model: nn.Module, x: Inputs, samples: int, *, hoist: bool | None = None
) -> Iterator[Any]:
    """The ``samples`` stochastic outputs of ``model`` on ``x``, one at a time, in order.

    Like :func:`mc_outputs` (same arguments, same hoisting, same draws) without stacking:
    the outputs may be of any type ``model`` returns. The hoisted prefix runs at the first
    ``next()``; consume the iterator before changing the model. The draws share their
    sigma = softplus(rho) (see :func:`bnnconvert.layers.posterior_cache`) until the
    iterator is exhausted or closed.
    """
    check_positive_int(samples=samples)
    plan = hoist_plan(model, loud=hoist is True) if hoist is not False else None
    if plan is None or not plan.accepts(x):
        return _cached(model, (call_model(model, x) for _ in range(samples)))
    return _cached(model, plan.iterate(x, samples))


def _cached(model: nn.Module, outputs: Iterator[Any]) -> Iterator[Any]:
    """``outputs`` consumed inside a :func:`posterior_cache` block of ``model``."""
    with posterior_cache(model):
        yield from outputs


@dataclass
class HoistPlan:
    """A model split into a deterministic prefix and a stochastic suffix.

    Attributes:
        prefix: ``prefix(x)`` (or ``prefix(**inputs)``) -> tuple of the hoisted tensors
            (and other values).
        suffix: ``suffix(*hoisted)`` -> the model's output for one posterior sample.
        norms: train-mode BatchNorm layers of the prefix (updated as if run S times).
        attrs: (target, object) of every model tensor the graphs read directly (get_attr),
            to detect a replaced parameter.
    """

    prefix: fx.GraphModule
    suffix: fx.GraphModule
    norms: tuple[_BatchNorm, ...]
    attrs: tuple[tuple[str, object], ...]

    def iterate(self, x: Inputs, samples: int) -> Iterator[Any]:
        """The prefix once, then the suffix's output for each of ``samples`` draws."""
        with _repeated_norm_updates(self.norms, samples):
            hoisted = call_model(self.prefix, x)
        for _ in range(samples):
            yield self.suffix(*hoisted)

    def accepts(self, x: Inputs) -> bool:
        """True unless ``x`` are keyword inputs that the traced forward cannot take (its
        arguments are the model's, ``*args``/``**kwargs`` excepted)."""
        if not isinstance(x, Mapping):
            return True
        try:
            inspect.signature(self.prefix.forward).bind(**x)
        except TypeError:
            log.debug("keyword inputs %s do not fit the traced forward: plain loop", list(x))
            return False
        return True

    def is_current(self, model: nn.Module) -> bool:
        """True while every object the graphs captured is still the model's."""
        try:
            return all(_fetch(model, target) is obj for target, obj in self.attrs)
        except AttributeError:
            return False


def hoist_plan(model: nn.Module, *, loud: bool = False) -> HoistPlan | None:
    """The cached :class:`HoistPlan` of ``model`` in its current state, or None (plain loop).

    The reason for None is logged once per model state (INFO if ``loud``, else DEBUG).
    """
    if _global_hooks():
        return None
    signature = _signature(model)
    entry = _CACHE.get(model)
    if entry is None or entry[0] != signature or not _entry_current(entry, model):
        plan = _build_plan(model)
        if isinstance(plan, str):
            log.log(
                logging.INFO if loud else logging.DEBUG,
                "Monte Carlo sampling of %s runs the plain loop: %s",
                type(model).__name__,
                plan,
            )
            plan = None
        entry = (signature, plan)
        _CACHE[model] = entry
    return entry[1]


_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, HoistPlan | None]] = (
    weakref.WeakKeyDictionary()
)


def _entry_current(entry: tuple[tuple, HoistPlan | None], model: nn.Module) -> bool:
    return entry[1] is None or entry[1].is_current(model)


def _signature(model: nn.Module) -> tuple:
    """What a plan depends on: each submodule's identity, class, mode, sampling and hooks."""
    return tuple(
        (id(m), type(m), m.training, getattr(m, "draws_noise", None), _has_hooks(m))
        for m in model.modules()
    )


def _has_hooks(m: nn.Module) -> bool:
    return bool(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
    )


def _global_hooks() -> bool:
    mod = torch.nn.modules.module
    return bool(
        mod._global_forward_hooks
        or mod._global_forward_pre_hooks
        or mod._global_backward_hooks
        or mod._global_backward_pre_hooks
    )


# ------------------------------------------------------------------------ tracing
class _Tracer(fx.Tracer):
    """Keeps Bayesian layers and sampling owners as leaves (called, not traced through)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (BayesianLayer, BayesianOwner)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module) -> tuple[fx.Graph, dict[str, object]] | str:
    """The fx graph of ``model`` and the constants tracing captured, or why it failed.

    The global RNG state and the model are left as found (tracing stores captured tensor
    constants on the root; they are moved out into the returned dict).
    """
    tracer = _Tracer()
    hooked = _hooked_traced_modules(model, tracer)
    if hooked:  # checked before tracing, which would call them with proxies
        return f"hooks on traced-through modules would be skipped ({', '.join(hooked)})"
    devices = _cuda_devices(model)
    keys = set(vars(model))
    with torch.random.fork_rng(devices=devices):
        before = _rng_states(devices)
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # any tracing failure: plain loop
            return f"torch.fx cannot trace it ({type(exc).__name__}: {exc})"
        finally:
            constants = {k: vars(model).pop(k) for k in set(vars(model)) - keys}
        drew = not all(map(torch.equal, before, _rng_states(devices)))
    if drew:
        return "tracing drew random numbers (a module samples outside the traced graph)"
    return graph, constants


def _hooked_traced_modules(model: nn.Module, tracer: fx.Tracer) -> list[str]:
    """Names of the root and non-leaf modules (those tracing inlines) that have hooks."""
    found = []

    def walk(m: nn.Module, name: str) -> None:
        if _has_hooks(m):
            found.append(name or "(root)")
        for child, sub in m.named_children():
            full = f"{name}.{child}" if name else child
            if not tracer.is_leaf_module(sub, full):
                walk(sub, full)

    walk(model, "")
    return found


def _cuda_devices(model: nn.Module) -> list[int]:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    tensors = [*model.parameters(), *model.buffers()]
    return sorted({t.device.index or 0 for t in tensors if t.is_cuda})


def _rng_states(devices: list[int]) -> list[Tensor]:
    return [torch.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in devices)]


def _fetch(model: nn.Module, target: str) -> object:
    obj = model
    for item in target.split(".") if target else ():
        obj = getattr(obj, item)
    return obj


# ------------------------------------------------------------------------ node kinds
def _name(target: object) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", "")


def _bound(node: fx.Node, arg: str) -> object:
    """The value of argument ``arg`` of a call_function node (defaults applied), or None."""
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return bound.arguments.get(arg)


def _module_is_stochastic(m: nn.Module) -> bool:
    """True if calling ``m`` may draw random numbers (itself or any descendant)."""
    return any(
        (isinstance(sub, BayesianLayer) and sub.draws_noise)
        or isinstance(sub, BayesianOwner)
        or (sub.training and isinstance(sub, (_DropoutNd, nn.RReLU)))
        for sub in m.modules()
    )


def _is_stateful(m: nn.Module) -> bool:
    """True if a call of ``m`` may update its buffers: train mode and buffers (a Bayesian
    layer's index and prior buffers are constants)."""
    if not m.training or isinstance(m, BayesianLayer):
        return False
    return any(True for _ in m.buffers())


def _repeatable_norm(m: nn.Module) -> bool:
    return isinstance(m, _BatchNorm) and m.training and m.track_running_stats


def _is_source(node: fx.Node, modules: dict[str, nn.Module], calls: Counter) -> bool:
    """True if the node must run once per sample whatever its inputs."""
    if node.op == "call_module":
        m = modules[node.target]
        if _module_is_stochastic(m):
            return True
        return _is_stateful(m) and not (_repeatable_norm(m) and calls[node.target] == 1)
    if node.op in ("call_function", "call_method") and _name(node.target) in _RANDOM_NAMES:
        return node.op == "call_method" or _bound(node, "training") is not False
    return False


def _mutated_arg(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The node whose tensor ``node`` modifies in place, or None."""
    out = node.kwargs.get("out")
    if isinstance(out, fx.Node):
        return out
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if node.op == "call_module":
        inplace = getattr(modules[node.target], "inplace", False) is True
    elif node.op == "call_method":
        inplace = node.target.endswith("_") and not node.target.startswith("_")
    elif node.op == "call_function":
        name = _name(node.target)
        inplace = (
            node.target in _INPLACE_OPERATORS
            or (name.endswith("_") and not name.endswith("__"))
            or _bound(node, "inplace") is True
        )
    else:
        inplace = False
    return first if inplace else None


def _viewed_arg(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The node whose tensor ``node``'s output may alias, or None."""
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if node.op == "call_module":
        return first if isinstance(modules[node.target], _VIEW_MODULES) else None
    if node.op in ("call_function", "call_method") and _name(node.target) in _VIEW_NAMES:
        return first
    return _mutated_arg(node, modules)  # an in-place op returns its mutated argument


# ------------------------------------------------------------------------ partition
@dataclass
class _Group:
    """Nodes that may share one tensor's storage, and the nodes mutating it in place."""

    members: set[fx.Node]
    mutations: set[fx.Node]


def _mutated_groups(nodes: list[fx.Node], modules: dict[str, nn.Module]) -> dict[fx.Node, _Group]:
    """Alias groups (keyed by their root node) that some node mutates in place."""
    root: dict[fx.Node, fx.Node] = {}
    groups: dict[fx.Node, _Group] = {}
    for n in nodes:
        parent = _viewed_arg(n, modules)
        root[n] = root[parent] if parent is not None else n
        group = groups.setdefault(root[n], _Group(set(), set()))
        group.members.add(n)
        target = _mutated_arg(n, modules)
        if target is not None:
            groups.setdefault(root[target], _Group({root[target]}, set())).mutations.add(n)
    return {r: g for r, g in groups.items() if g.mutations}


def _conflict(group: _Group, suffix: set[fx.Node], order: dict[fx.Node, int]) -> bool:
    """True if the group's tensor must be recomputed per sample: a suffix node mutates it,
    or a suffix node reads it before a prefix node mutates it."""
    if group.members <= suffix:
        return False
    if group.mutations & suffix:
        return True
    last = max(order[m] for m in group.mutations)
    return any(u in suffix and order[u] < last for m in group.members for u in m.users)


def _suffix_nodes(graph: fx.Graph, modules: dict[str, nn.Module]) -> set[fx.Node] | str:
    """The nodes to run per sample, or why hoisting is impossible."""
    nodes = [n for n in graph.nodes if n.op != "output"]
    order = {n: i for i, n in enumerate(nodes)}
    calls = Counter(n.target for n in nodes if n.op == "call_module")
    groups = _mutated_groups(nodes, modules)
    if any(r.op in ("placeholder", "get_attr") for r in groups):
        return "the forward mutates its input or a module tensor in place"
    suffix = {n for n in nodes if _is_source(n, modules, calls)}
    while True:
        for n in nodes:
            if any(a in suffix for a in n.all_input_nodes):
                suffix.add(n)
        moved = [g for g in groups.values() if _conflict(g, suffix, order)]
        if not moved:
            return suffix
        for g in moved:
            suffix |= g.members


def _build_plan(model: nn.Module) -> HoistPlan | str:
    """Trace and split ``model``; a string says why it cannot be hoisted."""
    if isinstance(model, _WRAPPERS) or hasattr(model, "_orig_mod"):
        # their forward does work of its own (gradient synchronisation, scattering,
        # compiled code) that a traced graph of the wrapped module would skip
        return f"{type(model).__name__} wraps the model (run hoisting on the model itself)"
    traced = _trace(model)
    if isinstance(traced, str):
        return traced
    graph, constants = traced
    modules = dict(model.named_modules())
    suffix = _suffix_nodes(graph, modules)
    if isinstance(suffix, str):
        return suffix
    nodes = list(graph.nodes)
    if not any(n.op in _CALLS and n not in suffix for n in nodes[:-1]):
        return "nothing to hoist (a stochastic operation reads the input directly)"
    hoisted = [n for n in nodes if n not in suffix and any(u in suffix for u in n.users)]
    output = nodes[-1]
    hoisted += [n for n in output.all_input_nodes if n not in suffix and n not in hoisted]
    prefix_graph, suffix_graph = _split(nodes, suffix, hoisted)
    targets = {n.target for n in nodes if n.op in ("call_module", "get_attr")}
    root = {t: constants[t] if t in constants else _fetch(model, t) for t in targets}
    attrs = {n.target for n in nodes if n.op == "get_attr"} - set(constants)
    norms = tuple(
        modules[n.target]
        for n in nodes
        if n.op == "call_module" and n not in suffix and _repeatable_norm(modules[n.target])
    )
    return HoistPlan(
        fx.GraphModule(root, prefix_graph, "HoistedPrefix"),
        fx.GraphModule(root, suffix_graph, "SampledSuffix"),
        norms,
        tuple((t, root[t]) for t in sorted(attrs)),
    )


def _split(
    nodes: list[fx.Node], suffix: set[fx.Node], hoisted: list[fx.Node]
) -> tuple[fx.Graph, fx.Graph]:
    """Copy ``nodes`` into a prefix graph (x -> tuple of ``hoisted``) and a suffix graph
    (*hoisted -> output)."""
    *body, output = nodes
    prefix, pre_env = fx.Graph(), {}
    for n in body:
        if n not in suffix:
            pre_env[n] = prefix.node_copy(n, pre_env.__getitem__)
    prefix.output(tuple(pre_env[n] for n in hoisted))
    sampled = fx.Graph()
    env = {n: sampled.placeholder(n.name) for n in hoisted}
    for n in body:
        if n in suffix:
            env[n] = sampled.node_copy(n, env.__getitem__)
    sampled.output(fx.map_arg(output.args[0], env.__getitem__))
    prefix.lint()
    sampled.lint()
    return prefix, sampled


# ------------------------------------------------------------------------ BatchNorm
@contextmanager
def _repeated_norm_updates(norms: tuple[_BatchNorm, ...], samples: int) -> Iterator[None]:
    """One forward of each layer in ``norms`` updates its running statistics as ``samples``
    forwards on the same batch would (up to rounding)."""
    if samples == 1 or not norms:
        yield
        return
    saved = [m.momentum for m in norms]
    try:
        for m in norms:
            m.momentum = _repeated_momentum(m, samples)
        yield
        with torch.no_grad():
            for m in norms:
                if m.num_batches_tracked is not None:
                    m.num_batches_tracked.add_(samples - 1)
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum


def _repeated_momentum(m: _BatchNorm, samples: int) -> float:
    """The momentum of one update equal to ``samples`` updates with the same statistics."""
    if m.momentum is None:  # cumulative moving average over num_batches_tracked batches
        seen = int(m.num_batches_tracked)
        return samples / (seen + samples)
    return 1.0 - (1.0 - m.momentum) ** samples
