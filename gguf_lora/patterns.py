"""PEFT's rank_pattern / alpha_pattern rule, exact and with a bound on its running time.

PEFT picks, for a module, the first key `p` for which `re.match(rf"(.*\\.)?({p})$", module)` matches
(peft.utils.other.get_pattern_key). The keys come from adapter_config.json, so a key can be a regular
expression that backtracks catastrophically, and Python's `re` can neither time out nor be interrupted.

Decision: keep Python's own `re` (so the answer is PEFT's, bit for bit, for every valid key), and bound
the time instead of guessing at pathology:
- a key whose compiled form has no repetition (literals, classes, alternations, anchors, look-arounds:
  almost every real key, e.g. `q_proj` or `layers.1.mlp.down_proj`) and few alternation paths is matched
  in-process: its cost is linear in the module name, times the number of paths;
- any other key (`\\d+`, `.*`, `(a+)+`) is matched by `re` in a child Python process with a deadline; a key
  still running at the deadline is refused with a message naming it, where PEFT itself would hang.
The `regex` package's timeout was the alternative; its syntax differs from `re` in corners (`{e<=1}` fuzzy
matching, `[[:alpha:]]` classes), so it would not always give PEFT's answer.
A key that is not a valid regular expression in PEFT's form is refused with re's reason. PEFT raises only
when it reaches that key for some module (an earlier key may match every module first); gguf-lora refuses it
whenever it is in the config: the config is broken, and the same file would fail in PEFT on another model.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterable, Sequence

try:
    from re import _constants as _sre, _parser as _sre_parse  # Python >= 3.11
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

PATHS_IN_PROCESS = 1024  # alternation paths through a repetition-free key matched without a child process
STEPS_IN_PROCESS = 2e7  # name length x paths x key length: a bound on re's steps for one in-process match
DEADLINE = 5.0  # seconds for all keys that need the child, plus PER_PAIR for each (key, module) pair
PER_PAIR = 2e-5
_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", _sre.MAX_REPEAT)}


class PatternError(ValueError):
    """A key that is not a valid expression in PEFT's form, or that ran past the deadline."""

    def __init__(self, pattern: str, reason: str, slow: bool = False):
        super().__init__(reason)
        self.pattern, self.reason, self.slow = pattern, reason, slow


def peft_form(pattern: str) -> str:
    return rf"(.*\.)?({pattern})$"


def compile_key(pattern: str) -> re.Pattern:
    """The key as PEFT matches it; PatternError with re's reason when it is not valid."""
    if not isinstance(pattern, str):
        raise PatternError(str(pattern), "it is not a string")
    try:
        return re.compile(peft_form(pattern))
    except (re.error, RecursionError, OverflowError, ValueError) as e:  # very deep nesting: RecursionError
        raise PatternError(pattern, getattr(e, "msg", None) or str(e) or type(e).__name__) from None


def _paths(items) -> float:
    """Alternation paths through a parsed, repetition-free expression; inf when it repeats."""
    total = 1.0
    for op, av in items:
        if op in _REPEATS:
            return float("inf")
        if op == _sre.SUBPATTERN:
            total *= _paths(av[-1])
        elif op == getattr(_sre, "ATOMIC_GROUP", None):
            total *= _paths(av)
        elif op == _sre.BRANCH:
            total *= sum(_paths(b) for b in av[1])
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            total *= _paths(av[1])
        elif op == _sre.GROUPREF_EXISTS:
            total *= _paths(av[1]) + (_paths(av[2]) if av[2] else 1)
        if total > PATHS_IN_PROCESS:
            return float("inf")
    return total


def paths(pattern: str) -> float:
    r"""Alternation paths through the key (inf when it repeats): matching it in PEFT's form takes at most
    about len(name) x paths x len(key) steps, as `(.*\.)?` tries each dot once and nothing else backtracks."""
    try:
        return _paths(_sre_parse.parse(pattern).data)
    except (re.error, RecursionError, OverflowError, ValueError):
        return float("inf")


_CHILD = r"""
import json, re, sys
patterns, names = json.loads(sys.stdin.read())
for p in patterns:
    c = re.compile(r"(.*\.)?(%s)$" % p)
    sys.stdout.write(json.dumps([i for i, n in enumerate(names) if c.match(n)]) + "\n")
    sys.stdout.flush()
"""


def _match_in_child(patterns: list[str], names: list[str]) -> list[set[int]]:
    """For each pattern, the indices of the names it matches, computed by re in a child process that is
    killed at the deadline."""
    deadline = DEADLINE + PER_PAIR * len(patterns) * len(names)
    payload = json.dumps([patterns, names])
    if not sys.executable:
        raise PatternError(patterns[0], "no Python interpreter is available to match it with a time limit")
    try:
        proc = subprocess.run([sys.executable, "-I", "-S", "-c", _CHILD], input=payload, capture_output=True,
                              text=True, timeout=deadline)
        out, failed = proc.stdout, proc.returncode != 0
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        done = out.count("\n")
        raise PatternError(patterns[min(done, len(patterns) - 1)],
                           f"matching it against the module names ran past {deadline:.0f} s (catastrophic "
                           "backtracking), where PEFT itself would hang", slow=True) from None
    lines = out.splitlines()
    if failed or len(lines) != len(patterns):
        raise PatternError(patterns[min(len(lines), len(patterns) - 1)], "Python could not match it: "
                           + (proc.stderr.strip().splitlines() or ["no answer"])[-1])
    return [set(json.loads(line)) for line in lines]


def first_keys(patterns: Sequence[str], names: Iterable[str]) -> dict[str, str | None]:
    """For each module name, PEFT's chosen key (the first that matches), or None; bounded in time."""
    patterns, names = list(patterns), list(names)
    compiled = [compile_key(p) for p in patterns]  # every key must be valid, as PEFT requires
    cost = [paths(p) * (len(p) + 1) for p in patterns]
    longest = max((len(n) for n in names), default=0) + 1
    slow = [i for i in range(len(patterns)) if cost[i] * longest > STEPS_IN_PROCESS]
    hits: dict[int, set[int]] = {}
    if slow and names:
        for i, found in zip(slow, _match_in_child([patterns[i] for i in slow], names)):
            hits[i] = found
    out: dict[str, str | None] = {}
    for j, name in enumerate(names):
        out[name] = next((patterns[i] for i, c in enumerate(compiled)
                          if (j in hits[i] if i in hits else c.match(name) is not None)), None)
    return out


def get_pattern_key(pattern_keys: Iterable[str], key: str) -> str:
    """PEFT's get_pattern_key for one module: the first matching key, else the module name itself."""
    return first_keys(list(pattern_keys), [key])[key] or key
