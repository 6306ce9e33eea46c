"""The click group ``bnnconvert``: error handling, logging, the help page.

Errors: every library error (ValueError, FileNotFoundError, TypeError, ...) raised by a
command is turned into a one-line message and exit status 1 by :class:`BnnGroup`; pass
``--debug`` (or set ``BNNCONVERT_DEBUG=1``) to see the traceback instead. The library's
messages name its arguments (``arch=...``, ``trust_pickle=True``); the one-line message,
and the log records shown on stderr, name the command-line flags instead
(:func:`to_flags`). Warnings (the library's, torch's) are shown the same way, one line
each, ``warning: <message>``, without Python's source line.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

import click

from .._version import __version__

__all__ = ["ARGUMENT_FLAGS", "BnnGroup", "main", "to_flags"]

log = logging.getLogger("bnnconvert")

ARGUMENT_FLAGS = {
    "trust_pickle=True": "--trust-pickle",
    "resume=False": "--restart",
    "arch_kwargs=...": "--arch-kwargs",
    "arch=...": "--arch",
    "size=...": "--size",
    "as_rgb=...": "--as-rgb",
    "task=...": "--task",
    "lr=...": "--lr",
    "inputs=...": "--input-shape",
    "out=...": "--out",
    "nproc=...": "--nproc",
    "overwrite=True": "--overwrite",
    "input_key=...": "--input-key",
    "target_key=...": "--target-key",
}
"""How the library's messages name an argument -> the flag that sets it."""


def to_flags(message: str) -> str:
    """``message`` with every argument of :data:`ARGUMENT_FLAGS` named by its flag."""
    for argument, flag in ARGUMENT_FLAGS.items():
        message = message.replace(argument, flag)
    return message


def _debug(ctx: click.Context) -> bool:
    """--debug on the command line, or BNNCONVERT_DEBUG set to anything but "" or "0"."""
    env = os.environ.get("BNNCONVERT_DEBUG", "")
    return bool(ctx.find_root().params.get("debug")) or env not in ("", "0")


def _one_line(exc: BaseException) -> str:
    text = to_flags(" ".join(str(exc).split()) or type(exc).__name__)
    if isinstance(exc, (ValueError, FileNotFoundError, TypeError, PermissionError)):
        return text
    return f"{type(exc).__name__}: {text}"


class BnnGroup(click.Group):
    """A click group that lists its commands in the order they were added, shows the
    first example of its "more" commands (:meth:`add_more_command`) under its own
    examples, and turns every library error into a one-line ``click.ClickException``
    (unless ``--debug``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.more: list[str] = []

    def add_more_command(self, command: click.Command) -> None:
        """Add ``command``; ``bnnconvert --help`` shows its first example (the first line
        of its epilog that starts with ``bnnconvert ``) under "More commands"."""
        self.add_command(command)
        self.more.append(command.name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # one line, with where to look instead of the usage
            if exc.ctx is None or _debug(ctx):
                raise
            hint = f" (see '{exc.ctx.command_path} --help')"
            raise click.UsageError(exc.format_message() + hint) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            raise click.Abort() from None
        except Exception as exc:
            if _debug(ctx):
                raise
            raise click.ClickException(
                f"{_one_line(exc)} (run with --debug for the traceback)"
            ) from None

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The workflow examples, then the first example of every "more" command."""
        super().format_epilog(ctx, formatter)
        examples = [e for e in (_first_example(self.commands[n]) for n in self.more) if e]
        if examples:
            formatter.write_paragraph()
            formatter.write_text("\b\nMore commands:\n" + "\n".join(examples))


def _first_example(command: click.Command) -> str | None:
    """The first line of a command's epilog that starts with "bnnconvert"."""
    lines = (line.strip() for line in (command.epilog or "").splitlines())
    return next((f"  {line}" for line in lines if line.startswith("bnnconvert ")), None)


EXAMPLES = """\b
Examples (the paper's three steps on the bundled real digits; any MedMNIST .npz works):
  bnnconvert train --arch bnnconvert.models:resnet18 \\
      --arch-kwargs num_classes=10,in_channels=1 --data demo:digits --epochs 3 -o det.pt
  bnnconvert saliency det.pt --data demo:digits -o saliency.pt
  bnnconvert convert det.pt --saliency saliency.pt --r-bayes 0.01 -o bayes.pt
  bnnconvert train bayes.pt --data demo:digits --epochs 2 --beta 0.01 --samples 5 -o trained.pt
  bnnconvert evaluate trained.pt --data demo:digits --samples 5 --json metrics.json
  bnnconvert predict trained.pt --data demo:digits -o cases/ --flag-top 0.05
  bnnconvert info trained.pt

\b
DATA is a MedMNIST-format .npz, a folder of images/ and masks/ (segmentation,
optionally under train/ val/ test/), package.module:factory returning a DataLoader, or
a bundled real set: demo:digits, demo:nuclei (segmentation), demo:ood.
A state_dict or Lightning checkpoint needs --arch package.module:factory [--arch-kwargs].
"""


@click.group(cls=BnnGroup, epilog=EXAMPLES, context_settings={"max_content_width": 100})
@click.version_option(__version__, message="bnnconvert %(version)s")
@click.option("--debug", is_flag=True, help="Show tracebacks (also BNNCONVERT_DEBUG=1).")
@click.option("-v", "--verbose", count=True, help="More log output (-vv: debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bars (default: when stderr is a terminal).",
)
def main(debug: bool, verbose: int, quiet: bool, progress: bool | None) -> None:
    """Convert a trained PyTorch model into a sparse (partial) Bayesian network."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    _log_to_stderr(click.get_current_context(), level)


class _FlagFormatter(logging.Formatter):
    """The bare message, with the library's argument names as flags (:func:`to_flags`)."""

    def format(self, record: logging.LogRecord) -> str:
        return to_flags(super().format(record))


def _show_warning(message: Warning | str, *args: Any, **kwargs: Any) -> None:
    """``warnings.showwarning`` while a command runs: one log line, ``warning: <message>``
    (whitespace collapsed, argument names as flags), without the file, line and code."""
    log.warning("warning: %s", " ".join(str(message).split()))


def _log_to_stderr(ctx: click.Context, level: int) -> None:
    """The library's log records and every warning go to stderr, bare, one line each,
    while the command runs."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_FlagFormatter("%(message)s"))
    saved = log.level, log.propagate, warnings.showwarning
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    warnings.showwarning = _show_warning

    def restore() -> None:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]
        warnings.showwarning = saved[2]

    ctx.call_on_close(restore)
