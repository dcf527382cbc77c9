"""One error hierarchy. Every message says what happened, why, and what to do, on one line."""
from __future__ import annotations


class GgufLoraError(Exception):
    """Base of all errors the library raises on purpose; the CLI prints them as one line and exits 1."""

    def __init__(self, what: str, why: str = "", fix: str = ""):
        self.what, self.why, self.fix = what, why, fix
        super().__init__(" ".join(_sentence(p) for p in (what, why, fix) if p))


def _sentence(text: str) -> str:
    """Capitalised and closed with a full stop, except names that are spelled lower-case (llama-server)."""
    first = text.split(" ", 1)[0]
    if not ("-" in first and first.islower()):
        text = text[0].upper() + text[1:]
    return text.rstrip(".") + "."


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


class ServerError(GgufLoraError):
    """A server (llama-server, Ollama) is unreachable, refused a request, failed it, or answered nonsense.

    `status` is the HTTP status when the server answered with an error status, else None.
    """

    def __init__(self, what: str, why: str = "", fix: str = "", status: int | None = None):
        super().__init__(what, why, fix)
        self.status = status


class ServerUnreachable(ServerError):
    """Nothing listens at the address (connection refused): not started yet, stopped, or the wrong URL."""


class MissingDependencyError(GgufLoraError):
    """An optional dependency a command needs is not installed (e.g. torch for verify)."""
