"""``main``: the ``neurenix`` command line, parsed, checked, then run.

Exit codes: 0 success, 2 a bad option (one line on stderr, ``neurenix: error: ...``), 1 a
failure at run time that the options could not foresee (missing data, a failed download).
Help and option errors need neither torch nor Lightning: :mod:`neurenix.cli.compare`, which
imports them, is imported only for a run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from jsonargparse import ArgumentParser, Namespace

from neurenix.cli.output import check_output, is_launching_process
from neurenix.cli.parser import PROG, SUBCOMMANDS, build_parser, one_line, parse
from neurenix.cli.settings import CompareError, UsageError, seeds_of

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Example::

        main(["--methods", "none", "ewc", "--epochs", "2", "--output", "runs"])
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "reproduce":  # its own parser and checks (neurenix.cli.reproduce)
        from neurenix.cli.reproduce import reproduce_command

        return reproduce_command(argv[1:])
    if not argv or argv[0] not in SUBCOMMANDS:
        argv.insert(0, SUBCOMMANDS[0])
    parser = build_parser()
    try:
        try:
            settings = parse(parser, argv)
        except SystemExit as done:  # --help and --print_config print and exit
            return 0 if done.code is None else int(done.code) if isinstance(done.code, int) else 1
        if is_launching_process():  # DDP's other ranks run this command line again: the folder is rank zero's
            check_output(Path(settings.output), settings.overwrite)
        from neurenix.cli.compare import run_compare  # torch and Lightning: only for a run

        run_compare(settings, config_yaml=_config_yaml(parser, settings))
    except UsageError as error:
        return _fail(str(error), status=2)
    except CompareError as error:
        return _fail(str(error), status=1)
    return 0


def _config_yaml(parser: ArgumentParser, settings: Namespace) -> str:
    """config.yaml of the run: what --config reads back (the subcommand's settings, no ``compare:`` level).

    ``overwrite`` is written as false: a config replays the settings of a run, not a permission
    to delete the next run's folder. The seeds are written as given: ``seeds`` for several,
    ``seed`` for one (0 when neither was given), never both (which the command refuses).
    """
    settings = settings.clone()
    settings.overwrite = False
    if settings.seeds is None:
        settings.seed = seeds_of(settings)[0]
    return parser.compare_parser.dump(settings)


def _fail(message: str, *, status: int) -> int:
    print(f"{PROG}: error: {one_line(message)}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
