"""One error hierarchy. Every message says what happened, why, and what to do, on one line."""
from __future__ import annotations

import re

# A single name (path, tensor, key, pattern) longer than this is shortened in the middle; a whole part too.
MAX_TOKEN = 160
MAX_PART = 800
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class GgufLoraError(Exception):
    """Base of all errors the library raises on purpose; the CLI prints them as one line and exits 1.

    `what` is printed as written (it often starts with a path, which must appear as the user typed it), so
    it is written with its own capital; `why` and `fix` are capitalised here."""

    def __init__(self, what: str, why: str = "", fix: str = ""):
        self.what, self.why, self.fix = what, why, fix
        parts = [_sentence(what, capitalise=False)] + [_sentence(p) for p in (why, fix) if p]
        super().__init__(" ".join(parts))


def shorten(text: str, limit: int = MAX_TOKEN) -> str:
    """`text` if short, else its start and end around an ellipsis that says how much was left out."""
    text = str(text)
    if len(text) <= limit:
        return text
    keep = max(8, (limit - 24) // 2)
    return f"{text[:keep]}…[{len(text) - 2 * keep} characters]…{text[-keep:]}"


def brief(value: object, limit: int = 80, quote: bool = True) -> str:
    """A short repr of an untrusted value (JSON, metadata): never recursive (repr of a 10,000-deep nesting
    overflows the stack), never long. quote=False shows a string as it is (a server's error text)."""
    if isinstance(value, str):
        return repr(shorten(value, limit)) if quote else shorten(value, limit)
    depth, nodes, stack = 0, 0, [(value, 1)]
    while stack and nodes < 10_000:
        v, d = stack.pop()
        nodes += 1
        depth = max(depth, d)
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend((x, d + 1) for x in v)
    if depth > 16 or nodes >= 10_000:
        return f"a {'nested ' if depth > 16 else ''}{type(value).__name__} of {len(value)} items"
    try:
        return shorten(repr(value), limit)
    except ValueError:  # an integer too long to print
        return f"a {type(value).__name__} too long to print"


def printable(text: str) -> str:
    """Control characters (a newline in a file name, a terminal escape) shown escaped, as Python writes them."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def one_line(text: str) -> str:
    """Control characters (newlines from a file's names or a server's text) shown escaped, long words
    shortened in the middle, the whole bounded: a message stays one readable line."""
    text = printable(text)
    text = re.sub(r"\S{%d,}" % (MAX_TOKEN + 1), lambda m: shorten(m.group()), text)
    return shorten(text, MAX_PART)


_LOWER_NAMES = ("llama-", "llama.cpp", "gguf-", "--")  # tools and options spelled lower-case


def _is_pathlike(word: str) -> bool:
    """A path, or an identifier such as general.alignment or num_hidden_layers: printed as written."""
    return word[:1] in "./~\\'\"" or "/" in word or "\\" in word or re.search(r"\w[._]\w", word) is not None


def _sentence(text: str, capitalise: bool = True) -> str:
    """Closed with a full stop; capitalised unless it starts with a name spelled lower-case (llama-server,
    --base) or a path."""
    text = one_line(text).strip()
    if not text:
        return ""
    first = text.split(" ", 1)[0]
    if capitalise and not first.startswith(_LOWER_NAMES) and not _is_pathlike(first):
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


class ValueRangeError(GgufLoraError):
    """A tensor's values do not fit the type it is written as (F16 holds at most 65504): Inf would be written."""


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


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived: raised like Ctrl-C, so every cleanup path runs, carrying the signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
