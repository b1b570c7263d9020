"""Errors the harness raises for bad input.

A :class:`HarnessError` is a problem with what the user gave us (a path, an id, a file, a
config), never a bug: the CLI prints its message on one line and exits with status 2, without a
traceback. Messages name the culprit and, where there is one, the fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class HarnessError(Exception):
    """Bad input, reported to the user as one line (CLI exit status 2)."""


class PluginError(HarnessError):
    """A plugin failed to load, raised in a hook, or registered something invalid."""


class UnknownIdError(HarnessError, KeyError):
    """An id that no plugin registered."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        self.kind, self.name, self.known = kind, name, sorted(known)
        super().__init__(self._message())

    def _message(self) -> str:
        msg = f"Unknown {self.kind} '{self.name}'."
        close = difflib.get_close_matches(self.name, self.known, n=1, cutoff=0.6)
        if close:
            msg += f" Did you mean '{close[0]}'?"
        msg += " Known: " + (", ".join(self.known) if self.known else "(none registered)") + "."
        return msg

    def __str__(self) -> str:  # KeyError would repr() the message
        return self._message()


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return " Did you mean 'x'?" for the closest choice, or "" when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""
