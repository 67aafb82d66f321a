"""The errors a user can cause, under one base the CLI reports as one line.

Anything that is an ``EarthrayError`` says what is wrong with what the user gave (a spec, a file,
a bundle, a request, the data named) and where; the CLI prints it without a traceback. Any other
exception is a bug in earthray or its dependencies and keeps its traceback.
Each class also derives from the builtin a caller would catch without knowing earthray
(``ValueError``, ``KeyError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class EarthrayError(Exception):
    """A problem with the user's input; the message says what and where."""


class ConfigError(EarthrayError, ValueError):
    """A spec, catalogue or model configuration that cannot be used."""


class DataError(EarthrayError, ValueError):
    """Data that does not fit what reads it: a group, a manifest, a batch the model was not built for."""


class NotFound(EarthrayError, KeyError):
    """A named thing (group, sensor, recipe, preset, head, label layer, model) that does not exist."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class NotReady(EarthrayError, TimeoutError):
    """Something started for the user (a Serve application, a cluster) did not become ready in time."""
