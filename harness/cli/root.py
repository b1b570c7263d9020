"""The root ``harness`` group: error handling and logging shared by every command.

Nothing a user types ends in a traceback. Bad input (a :class:`harness.errors.HarnessError`, or
click's usage errors: an unknown option, a value of the wrong type or out of range) is printed as
one ``Error: ...`` line and the command exits with status 2; so is an operating-system error (a
full disk, a permission refused), naming the file. Anything else is a bug: one line saying so,
exit status 1, and the traceback only with ``-vv``.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any

import click

from harness import __version__
from harness.errors import HarnessError
from harness.hf import pickled_checkpoint_error

log = logging.getLogger("harness")


def one_line(text: str) -> str:
    """``text`` on one line (a message carrying a file's content or a library's multi-line
    error would otherwise break the one-line contract)."""
    lines = (line.strip() for line in str(text).splitlines())  # \r, \x85, \u2028 too
    return " ".join(line for line in lines if line) or "(no message)"


class HarnessGroup(click.Group):
    """Turns every error into one line: exit status 2 for bad input, 1 for a bug."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:  # an unknown option of the root group itself
            raise _usage_line(exc) from exc

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HarnessError as exc:
            raise _UserError(one_line(_without_unpickling_advice(exc))) from exc
        except click.UsageError as exc:
            raise _usage_line(exc) from exc
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except OSError as exc:
            raise _UserError(_os_error(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback with -vv
            refused = pickled_checkpoint_error(exc)
            if refused is not None:  # torch refused to unpickle a file: bad input, not a bug
                raise _UserError(str(refused)) from exc
            if log.isEnabledFor(logging.DEBUG):
                click.echo(traceback.format_exc(), err=True, nl=False)
            raise _InternalError(
                f"internal error ({type(exc).__name__}: {one_line(str(exc))}); this is a bug in "
                "harness or a plugin: rerun with -vv for the traceback and report it"
            ) from exc


class _UserError(click.ClickException):
    exit_code = 2


class _InternalError(click.ClickException):
    exit_code = 1


def _usage_line(exc: click.UsageError) -> click.ClickException:
    """click's usage error (usage, hint and message on four lines) as one line naming where the
    help is. With no arguments at all, a group still prints its help."""
    if isinstance(exc, click.exceptions.NoArgsIsHelpError):
        return exc
    where = exc.ctx.command_path if exc.ctx is not None else "harness"
    return _UserError(f"{one_line(exc.format_message())} (see {where} --help)")


def _without_unpickling_advice(exc: HarnessError) -> str:
    """The message, unless it passes on torch's advice to unpickle a refused checkpoint with
    ``weights_only=False`` (a plugin quoting torch's error): then the safetensors refusal."""
    text = str(exc)
    if "weights_only" in text or "Weights only load failed" in text:
        refused = pickled_checkpoint_error(exc)
        return str(refused) if refused is not None else text
    return text


def _os_error(exc: OSError) -> str:
    """``OSError(28, ..., '/runs/x')`` as ``No space left on device: '/runs/x'``."""
    what = exc.strerror or type(exc).__name__
    files = " -> ".join(f"'{f}'" for f in (exc.filename, exc.filename2) if f is not None)
    return one_line(f"{what}: {files}" if files else f"{what}: {exc}")


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


@click.group("harness", cls=HarnessGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="harness")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def cli(verbose: int) -> None:
    """Benchmark text-to-image reward models against human labels (TIA2), calibrate them with
    TextNorm, and fine-tune Stable Diffusion against them."""
    _setup_logging(verbose)
