"""Test-only entry point: the ``bnnconvert`` command line with a training loop that
SIGKILLs its own process after N optimiser steps (an interruption that no ``finally``
block or signal handler can soften).

    python -m tests.kill_after N train bayes.pt --data ... -o out.pt

It wraps the library's ``train`` as the ``train`` command module sees it, adding an
``on_step`` callback; the package itself ships no testing hook.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from bnnconvert.cli import main, train_cmd


def _killing_train(limit: int):
    original = train_cmd.fit

    def train(*args: Any, **kwargs: Any):
        def on_step(info: Any) -> None:
            if info.global_step >= limit:
                os.kill(os.getpid(), signal.SIGKILL)

        return original(*args, on_step=on_step, **kwargs)

    return train


if __name__ == "__main__":
    train_cmd.fit = _killing_train(int(sys.argv[1]))
    main(sys.argv[2:], prog_name="bnnconvert")
