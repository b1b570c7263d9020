"""The root ``harness`` group: error handling and logging shared by every command.

Bad input raises :class:`harness.errors.HarnessError`; it is printed as one ``Error: ...`` line
and the command exits with status 2, without a traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from harness import __version__
from harness.errors import HarnessError


class HarnessGroup(click.Group):
    """Turns :class:`HarnessError` into a one-line error with exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HarnessError as exc:
            raise _UserError(str(exc)) from exc


class _UserError(click.ClickException):
    exit_code = 2


class _WarningFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.capitalize()}: {record.getMessage()}"


def _setup_logging(verbose: int) -> None:
    logger = logging.getLogger("harness")
    if not any(getattr(h, "_harness", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_WarningFormatter())
        handler._harness = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)


@click.group(cls=HarnessGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="harness")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def cli(verbose: int) -> None:
    """Benchmark text-to-image reward models against human labels (TIA2), calibrate them with
    TextNorm, and fine-tune Stable Diffusion against them."""
    _setup_logging(verbose)
