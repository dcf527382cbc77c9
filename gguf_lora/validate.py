"""The boundary for JSON files we are handed (adapter_config.json, a model's config.json): parsed once, and
every value we use checked for its type and range, so that past this point code sees well-formed values only.

A malformed value is the project's own error naming the file and the key; nothing here trusts that a key
holds what its name promises (`"r": "8"`, `"architectures": "LlamaForCausalLM"`, a 10,000-deep nesting).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .errors import GgufLoraError, InputError, brief

MAX_CONFIG = 64 * 2**20  # a config is a few kB; a bigger file is not one
_MISSING = object()


def load_json_object(path: Path, error: type[GgufLoraError] = InputError,
                     fix: str = "fix the file or save it again") -> dict[str, Any]:
    """A JSON file that must hold one object: unreadable, too big, not UTF-8, not JSON, too deeply nested,
    or not an object are each one error naming the file."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG:
            raise error(f"{path} has {size:,} bytes", "a JSON config is a few kilobytes; this is not one", fix)
        text = path.read_bytes().decode("utf-8-sig")
        doc = json.loads(text)
    except OSError as e:
        raise error(f"{path} cannot be read ({e.strerror or e})", "", "check the path and its permissions") from None
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})", "a JSON config is text", fix) from None
    except RecursionError:
        raise error(f"{path} nests its JSON too deeply", "no config nests more than a few levels", fix) from None
    except ValueError as e:
        raise error(f"{path} is not valid JSON ({str(e).splitlines()[0] if str(e) else 'empty'})", "", fix) from None
    if not isinstance(doc, dict):
        raise error(f"{path} holds {brief(doc, 40)}, not a JSON object", "a config is one {...} object", fix)
    return doc


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)


# kind -> (check, how the expectation is said)
KINDS: dict[str, tuple[Any, str]] = {
    "int>0": (lambda v: is_int(v) and v > 0, "a positive integer"),
    "int>=0": (lambda v: is_int(v) and v >= 0, "a non-negative integer"),
    "number": (is_number, "a finite number"),
    "number>=0": (lambda v: is_number(v) and v >= 0, "a non-negative finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "str|strs": (lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
                 "a string or a list of strings"),
    "strs": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "list": (lambda v: isinstance(v, list), "a list"),
    "dict": (lambda v: isinstance(v, dict), "an object"),
}


def checked(doc: dict[str, Any], key: str, kind: str, path: Path, *, error: type[GgufLoraError] = InputError,
          default: Any = _MISSING, fix: str = "fix the file or save it again", shown: str | None = None) -> Any:
    """doc[key] checked against `kind`. null counts as absent. Absent: `default`, or an error when there is
    none. `shown` is how the key is named in messages (e.g. text_config.num_hidden_layers)."""
    value = doc.get(key)
    name = shown or key
    if value is None:
        if default is _MISSING:
            raise error(f"{path} has no {name}", f"it must be {KINDS[kind][1]}", fix)
        return default
    check, said = KINDS[kind]
    if not check(value):
        raise error(f"{path}: {name} is {brief(value)}, not {said}", "", fix)
    return value


def usable_path(path: str | Path, role: str = "") -> Path:
    """`path` as a Path, or an error naming it when the system cannot even look it up (a name too long, a
    folder without permission, a NUL byte). A path that does not exist is fine here: callers say so better."""
    p = Path(path)
    try:
        os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as e:
        raise InputError(f"{role}{p} cannot be used ({e.strerror or e})", "the system refused to look it up",
                         "check the path and the permissions of its folders") from None
    except ValueError:
        raise InputError(f"{role}{p!r} cannot be used", "it contains a NUL character", "check the path") from None
    return p
