"""One error hierarchy. Every message says what happened, why, and what to do, on one line."""
from __future__ import annotations


class GgufLoraError(Exception):
    """Base of all errors the library raises on purpose; the CLI prints them as one line and exits 1."""

    def __init__(self, what: str, why: str = "", fix: str = ""):
        self.what, self.why, self.fix = what, why, fix
        super().__init__(" ".join(p[0].upper() + p[1:].rstrip(".") + "." for p in (what, why, fix) if p))


class InputError(GgufLoraError):
    """An input file or folder is missing, unreadable or not what it claims to be."""


class AdapterError(GgufLoraError):
    """The adapter is readable but malformed (bad config, NaN weights, inconsistent ranks)."""


class UnsupportedError(GgufLoraError):
    """The adapter uses a feature that the requested output cannot express."""


class BaseMismatchError(GgufLoraError):
    """The adapter does not fit the base model (architecture, missing tensor, shape)."""


class OutputError(GgufLoraError):
    """The output cannot be written where asked (exists, missing folder, disk full, is an input)."""
