"""rank_pattern / alpha_pattern: our bounded matcher against PEFT's own get_pattern_key on generated keys and
module names. Valid keys give PEFT's answer exactly (in-process or through the child process); invalid ones
are refused where PEFT raises; a catastrophic key is refused within the deadline where PEFT would hang."""
from __future__ import annotations

import re
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from peft.utils.other import get_pattern_key as peft_get_pattern_key

import fuzz_support as fz
from gguf_lora import patterns

PIECES = ["q_proj", "k_proj", "v_proj", "o_proj", "proj", "layers", "self_attn", "mlp", "model", "0", "1", "11",
          ".", r"\.", "_", "|", "(", ")", "[01]", "[^.]", "^", "$", r"\d", "?", "(?:", "(?=q)", "(?!v)", r"\b",
          "{1}", "*", "+", "+?", ".*", r"\d+", "[a-z]+", "(?i)", "\\"]
keys = st.lists(st.sampled_from(PIECES), min_size=1, max_size=7).map("".join)
names = st.lists(st.sampled_from(["model", "layers", "0", "1", "11", "self_attn", "mlp", "q_proj", "v_proj",
                                  "down_proj", "embed_tokens"]), min_size=1, max_size=6).map(".".join)


def peft_answer(pattern_keys: list[str], name: str):
    """PEFT's answer, or the exception it raises (an invalid key)."""
    try:
        return peft_get_pattern_key(pattern_keys, name)
    except re.error:
        return re.error


def _invalid(key: str) -> bool:
    try:
        re.compile(rf"(.*\.)?({key})$")
        return False
    except re.error:
        return True


def _catastrophic(key: str) -> bool:
    """Keys whose backtracking could hang PEFT itself on our names: the fuzz compares only keys PEFT can run."""
    return bool(re.search(r"[*+}]\)?[*+]|\)[*+].*[*+]|\.\*.*\.\*.*\.\*", key))


@fz.seed_decorator()
@fz.fuzz(300)
@given(pattern_keys=st.lists(keys, min_size=1, max_size=3), module_names=st.lists(names, min_size=1, max_size=4))
def test_bounded_matcher_is_peft_rule(pattern_keys, module_names):
    if any(_catastrophic(k) for k in pattern_keys):
        pattern_keys = [k for k in pattern_keys if not _catastrophic(k)] or ["q_proj"]
    expected = {n: peft_answer(pattern_keys, n) for n in module_names}
    invalid = any(_invalid(k) for k in pattern_keys)
    if invalid:  # refused, whether or not PEFT reaches the key for these names (it raises when it does)
        with pytest.raises(patterns.PatternError):
            patterns.first_keys(pattern_keys, module_names)
        said = " (PEFT raises too)" if re.error in expected.values() else " (PEFT never reaches it)"
        fz.record("rank_pattern rule vs PEFT", "invalid key refused" + said)
        return
    assert re.error not in expected.values()
    got = patterns.first_keys(pattern_keys, module_names)
    assert {n: got[n] or n for n in module_names} == expected
    fz.record("rank_pattern rule vs PEFT", "same answer" + (" (child process)" if any(
        patterns.paths(k) == float("inf") for k in pattern_keys) else " (in-process)"))


@pytest.mark.parametrize("key", ["(a+)+$", "(.*)*x", "(x+x+)+y", "(.*a){20}", "(.*){10}q"])
def test_catastrophic_key_is_refused_within_the_deadline(key, monkeypatch):
    monkeypatch.setattr(patterns, "DEADLINE", 1.0)
    name = "x" * 30 + "." + "a" * 30 + ".model.layers.0.self_attn.q_proj"
    t0 = time.monotonic()
    with pytest.raises(patterns.PatternError) as e:
        patterns.first_keys([key, "q_proj"], [name])
    assert e.value.slow and e.value.pattern == key
    assert time.monotonic() - t0 < 5


def test_in_process_paths_are_bounded():
    assert patterns.paths("layers.1.mlp.down_proj") == 1
    assert patterns.paths("(qq|kk|vv)_proj") == 3
    assert patterns.paths(r"layers\.\d+\.q_proj") == float("inf")
    assert patterns.paths("(ab|cd)" * 11) == float("inf")  # 2048 paths: sent to the child
