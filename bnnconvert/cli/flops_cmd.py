"""``bnnconvert flops``: the FLOP report of a checkpoint, and the cost of each method.

A thin click wrapper over :func:`bnnconvert.costs.flops_report_text`.
"""

from __future__ import annotations

import json
from typing import Any

import click
import torch

from ..costs import compare_method_costs, flops_report_text, parse_input_shape
from ..flops import count_flops
from .options import device_option, load_cli_model, model_options

__all__ = ["flops"]


def _shape(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        return parse_input_shape(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command(
    "flops",
    epilog="""\b
Examples:
  bnnconvert flops bayes.pt --input-shape 1,1,28,28
  bnnconvert flops det.pt --input-shape 50,1,28,28 --compare
  bnnconvert flops bayes.pt --input-shape 1,1,28,28 --samples 5 --convention flop --json""",
)
@click.argument("model")
@click.option(
    "--input-shape",
    required=True,
    callback=_shape,
    metavar="N,C,H,W",
    help="Shape of one input batch, e.g. 1,3,224,224 (counts are for the whole batch).",
)
@device_option
@click.option(
    "--samples",
    default=None,
    show_default="1; the --compare inference column: 5",
    type=click.IntRange(1),
    help="Monte Carlo forward passes of a prediction, also S of the inference column of "
    "--compare (its training columns keep S = 5).",
)
@click.option(
    "--convention",
    type=click.Choice(["fma", "flop"]),
    default="fma",
    show_default=True,
    help="fma: one fused multiply-add = 1 FLOP (fvcore); flop: x2 (textbook).",
)
@click.option(
    "--compare",
    is_flag=True,
    help="Add the cost of each method (deterministic, ensemble, partial r, fully Bayesian) "
    "in multiples of the deterministic model, like Table 1 of the paper.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
@model_options
def flops(
    model: str,
    input_shape: tuple[int, ...],
    device: str,
    samples: int | None,
    convention: str,
    compare: bool,
    as_json: bool,
    **o: Any,
) -> None:
    """FLOPs per forward (fvcore), the Bayesian overhead, and with --compare the training
    and inference cost of each method."""
    net = load_cli_model(model, o["arch"], o["arch_kwargs"], o["trust_pickle"])
    if not as_json:
        click.echo(flops_report_text(net, input_shape, device, compare, samples, convention))
        return
    dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)
    inputs = torch.randn(input_shape, dtype=dtype)
    forwards = 1 if samples is None else samples
    report = count_flops(net, inputs, samples=forwards, device=device, convention=convention)
    facts: dict[str, Any] = {
        "input_shape": list(input_shape),
        "samples": forwards,
        "convention": convention,
        "total": report.total,
        "per_forward": report.per_forward,
        "bayes_overhead": report.bayes_overhead,
        "bayesian_entries": report.bayesian_entries,
        "by_module": report.by_module,
        "unsupported_ops": report.unsupported_ops,
    }
    if compare:
        table = compare_method_costs(
            net, inputs, inference_samples=samples, device=device, convention=convention
        )
        facts["inference_samples"] = table.inference_samples
        facts["multiples_of_deterministic"] = table.multiples()
    click.echo(json.dumps(facts, indent=2))
