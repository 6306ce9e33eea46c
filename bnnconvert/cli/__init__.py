"""The ``bnnconvert`` command line: the only part of the package that knows about flags.

One module per command group, each a thin layer over public library functions:

- :mod:`~bnnconvert.cli.group`: the click group :func:`main`, error handling and logging;
- :mod:`~bnnconvert.cli.options`: the options and helpers the commands share;
- :mod:`~bnnconvert.cli.convert_cmd`: ``saliency``, ``convert``;
- :mod:`~bnnconvert.cli.train_cmd`: ``train``;
- :mod:`~bnnconvert.cli.evaluate_cmd`: ``evaluate``, ``info``;
- :mod:`~bnnconvert.cli.predict_cmd`: ``predict``;
- :mod:`~bnnconvert.cli.flops_cmd`, :mod:`~bnnconvert.cli.benchmark_cmd`,
  :mod:`~bnnconvert.cli.demo_cmd`: ``flops``, ``benchmark``, ``demo``.

Every command is registered here, explicitly: a command that fails to import fails the
import of the CLI, it is never silently left out.
"""

from .benchmark_cmd import benchmark_command
from .convert_cmd import convert, saliency
from .demo_cmd import demo_command
from .evaluate_cmd import evaluate, info
from .flops_cmd import flops
from .group import BnnGroup, main
from .options import data_options, model_options
from .predict_cmd import predict_command
from .train_cmd import train

__all__ = ["BnnGroup", "data_options", "main", "model_options"]

for _command in (saliency, convert, train, evaluate, predict_command, info):
    main.add_command(_command)
for _command in (flops, benchmark_command, demo_command):  # under "More commands" in --help
    main.add_more_command(_command)
