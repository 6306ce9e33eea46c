"""``bnnconvert demo``: a thin click wrapper over :func:`bnnconvert.demo.run_demo`."""

from __future__ import annotations

import click

from ..demo import run_demo
from .options import device_option, r_bayes_type, show_progress

__all__ = ["demo_command"]


@click.command(
    "demo",
    epilog="""\b
Examples:
  bnnconvert demo                      # about 4 minutes on an idle 2-core CPU
  bnnconvert demo --out results --seed 1 --r-bayes 1%,5%,20%
  bnnconvert demo --full               # the paper's 50 + 50 epochs, r_bayes 1 to 80 %""",
)
@click.option(
    "--out",
    default="demo_output",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for results.md, results.json and the plots.",
)
@click.option("--quick", is_flag=True, help="A tiny budget (seconds; for smoke tests).")
@click.option("--full", is_flag=True, help="The paper's protocol: 50 + 50 epochs, S = 5, r 1-80 %.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds everything.")
@device_option
@click.option(
    "--r-bayes",
    type=r_bayes_type(many=True),
    help="Bayesian fractions, comma-separated: 0.01,0.05 or 1%,5% (default: 0.01; "
    "--full: 1%,5%,10%,20%,40%,80%).",
)
def demo_command(
    out: str, quick: bool, full: bool, seed: int, device: str, r_bayes: tuple | None
) -> None:
    """The paper's recipe end to end on the bundled real data: train a ResNet18 (digits)
    and a UNet (nuclei), saliency, convert at r_bayes = 1 %, ELBO fine-tuning, then compare
    with the deterministic model trained for as many extra epochs (metrics, OOD AUROC,
    FLOPs) and write the report and plots."""
    if quick and full:
        raise click.UsageError("pass either --quick or --full, not both")
    progress = show_progress(click.get_current_context())
    result = run_demo(
        out, quick=quick, full=full, seed=seed, device=device, r_bayes=r_bayes, progress=progress
    )
    click.echo(result.markdown())
    click.echo("Wrote " + ", ".join(str(p) for p in result.files))
