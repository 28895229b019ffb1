"""The ``neurenix`` command: a continual-learning comparison, offline, in one line.

``neurenix`` (or ``neurenix compare``, or ``python -m neurenix``) trains one small MLP per
method on the same task sequence from the same seed, plain fine-tuning (``none``) included, and
reports what each method kept: a table, ``results.json``, TensorBoard logs and a plot of the
forgetting curves. Every option can also come from a YAML file (``--config``); ``--print_config``
prints one.

The modules, each importing only modules above it in this list:

- :mod:`~neurenix.cli.settings`: the errors, the methods and their settings;
- :mod:`~neurenix.cli.parser`: the options (jsonargparse), their checks, ``--config`` files;
- :mod:`~neurenix.cli.output`: the output folder, one run per folder;
- :mod:`~neurenix.cli.runs`: the data, the model, the methods' callbacks, a Trainer per method;
- :mod:`~neurenix.cli.report`: the table, ``results.json``, ``config.yaml``, the plot;
- :mod:`~neurenix.cli.compare`: one comparison, the runs then the reports;
- :mod:`~neurenix.cli.command`: ``main``.

The first three and ``command`` import neither torch nor Lightning; ``command`` imports
``compare`` only for a run, so that ``neurenix --help`` and option errors answer at once.
"""

from neurenix.cli.command import main

__all__ = ["main"]
