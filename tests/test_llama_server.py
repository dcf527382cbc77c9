"""The llama-server client and managed process against the real, pinned llama-server.

The reference for "the right answer" is always a fresh llama-server started by the test itself
(tests/llamacpp.Server) with just that adapter on its command line: no switching, no cache.
"""
from __future__ import annotations

import pytest
import requests
from llamacpp import Server

from gguf_lora.errors import InputError, ServerError
from gguf_lora.runtime.llama_server import LlamaServer, ManagedServer

P = "Hello there, how are you today? Tell me a story about"
Q = "Completely different words here"
# The same numerics as tests/llamacpp.Server: f32 KV cache, no flash attention, one slot.
EXACT = ["-c", "512", "-np", "1", "-t", "2", "--cache-type-k", "f32", "--cache-type-v", "f32", "--flash-attn", "off"]


def greedy(url: str, prompt: str, lora: list | None = None, cache: bool | None = None) -> tuple:
    """A raw request (not our client): the text and the top log-probabilities of 4 greedy steps."""
    body = {"prompt": prompt, "n_predict": 4, "n_probs": 3, "temperature": 0.0}
    if lora is not None:
        body["lora"] = lora
    if cache is not None:
        body["cache_prompt"] = cache
    r = requests.post(url + "/completion", json=body, timeout=60)
    r.raise_for_status()
    return answer(r.json())


def answer(doc: dict) -> tuple:
    return doc["content"], [[(t["token"], t["logprob"]) for t in step["top_logprobs"]]
                            for step in doc["completion_probabilities"]]


@pytest.fixture(scope="module")
def fresh(chat_model, tmp_path_factory):
    """What fresh servers with one adapter set each answer for P and Q: the references."""
    base, adapters = chat_model
    log = tmp_path_factory.mktemp("fresh")
    sets = {"base": [], "sql": ["sql"], "poem": ["poem"], "both": ["sql", "poem"]}
    out = {}
    for key, names in sets.items():
        s = Server(base, [adapters / f"{n}.gguf" for n in names], log / f"{key}.log")
        try:
            # P twice: the second answer comes from a warm prompt cache, which shifts logprobs by ~1e-5
            out[key] = {"P": greedy(s.url, P), "P_warm": greedy(s.url, P), "Q": greedy(s.url, Q)}
        finally:
            s.stop()
    half = Server(base, [], log / "half.log", extra=["--lora-scaled", f"{adapters / 'sql.gguf'}:0.5"])
    try:
        out["sql@0.5"] = {"P": greedy(half.url, P), "P_warm": greedy(half.url, P)}
    finally:
        half.stop()
    assert len({repr(v["P"]) for v in out.values()}) == len(out), "each adapter set must answer differently"
    return out


@pytest.fixture(scope="module")
def managed(chat_model, tmp_path_factory):
    base, adapters = chat_model
    with ManagedServer(base, adapters, extra_args=EXACT, log=tmp_path_factory.mktemp("m") / "log") as client:
        yield client


def test_init_without_apply_trap_and_workaround(chat_model, fresh, tmp_path):
    """llama.cpp trap: --lora-init-without-apply reports and applies scale 1.0 to requests without `lora`.
    A managed server states its scales right after start, so it answers as the bare base."""
    base, adapters = chat_model
    raw = Server(base, [adapters / "sql.gguf", adapters / "poem.gguf"], tmp_path / "raw.log",
                 extra=["--lora-init-without-apply"])
    try:
        assert [a["scale"] for a in requests.get(raw.url + "/lora-adapters").json()] == [1.0, 1.0]
        assert greedy(raw.url, P) == fresh["both"]["P"]  # "without apply" applies both
    finally:
        raw.stop()
    with ManagedServer(base, adapters, extra_args=EXACT, log=tmp_path / "m.log") as client:
        assert [(a.name, a.scale) for a in client.adapters()] == [("poem", 0.0), ("sql", 0.0)]
        assert greedy(client.url, P) == fresh["base"]["P"]


def test_global_switch_stale_cache_trap(chat_model, fresh, tmp_path):
    """llama.cpp trap: after POST /lora-adapters, a request without `lora` reuses the prompt cache computed
    under the previous adapter and returns output that belongs to neither adapter."""
    base, adapters = chat_model
    raw = Server(base, [adapters / "sql.gguf", adapters / "poem.gguf"], tmp_path / "raw.log")
    try:
        requests.post(raw.url + "/lora-adapters", json=[{"id": 0, "scale": 1.0}]).raise_for_status()
        assert greedy(raw.url, P) == fresh["sql"]["P"]
        requests.post(raw.url + "/lora-adapters", json=[{"id": 1, "scale": 1.0}]).raise_for_status()
        stale = greedy(raw.url, P)
        assert stale != fresh["poem"]["P"] and stale != fresh["sql"]["P"]
    finally:
        raw.stop()


def test_requests_without_adapter_field_follow_use_exactly(managed, fresh):
    """After `use`, any client's request without `lora` (warm cache or not) gets exactly that adapter's result."""
    for name in ["sql", "poem", "sql", "poem"]:
        managed.use(name)
        assert greedy(managed.url, P) == fresh[name]["P"]
        assert greedy(managed.url, P) == fresh[name]["P"]  # the server keeps no stale cache to reuse
        # a client that asks for the cache gets the cache computed under this adapter, as a fresh server does
        assert greedy(managed.url, P, cache=True) == fresh[name]["P_warm"]
    managed.use({})
    assert greedy(managed.url, P) == fresh["base"]["P"]
    chat = requests.post(managed.url + "/v1/chat/completions",  # the OpenAI SDK's request shape
                         json={"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                               "temperature": 0}, timeout=60)
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"]


def test_ram_prompt_cache_trap_and_explicit_lists(chat_model, fresh, tmp_path):
    """llama.cpp trap: even with an explicit adapter list per request, the RAM prompt cache (--cache-ram, on by
    default) restores KV computed under another adapter. The client turns prompt caching off for its
    requests on servers it did not configure, and is then exact."""
    base, adapters = chat_model
    raw = Server(base, [adapters / "sql.gguf", adapters / "poem.gguf"], tmp_path / "raw.log")
    try:
        trusting = LlamaServer(raw.url, prompt_cache=True)
        assert answer(trusting.complete(P, adapter="poem", n_predict=4, n_probs=3, temperature=0)) == fresh["poem"]["P"]
        assert answer(trusting.complete(Q, adapter="sql", n_predict=4, n_probs=3, temperature=0)) == fresh["sql"]["Q"]
        stale = trusting.complete(P, adapter="sql", n_predict=4, n_probs=3, temperature=0)
        assert stale["timings"]["cache_n"] > 0 and answer(stale) != fresh["sql"]["P"]

        client = LlamaServer(raw.url)  # default: no prompt cache on a server we did not start
        for name, prompt in [("poem", P), ("sql", Q), ("sql", P), ("poem", P), ("sql", P)]:
            assert answer(client.complete(prompt, adapter=name, n_predict=4, n_probs=3, temperature=0)) == \
                fresh[name]["P" if prompt == P else "Q"]
    finally:
        raw.stop()


def test_per_request_selection_matches_fresh_servers(managed, fresh):
    """Switching per request on one prompt, in any order, cache on: each answer is a fresh server's."""
    order = ["sql", "poem", {}, {"sql": 0.5}, "sql", ["poem"], "poem.gguf", {"sql": 0.5}, 1, 0]
    keys = ["sql", "poem", "base", "sql@0.5", "sql", "poem", "poem", "sql@0.5", "sql", "poem"]
    for i, (selection, key) in enumerate(zip(order, keys)):
        got = managed.complete(P, adapter=selection, n_predict=4, n_probs=3, temperature=0)
        # the managed client keeps the prompt cache; it is reused only under the same adapter set
        warm = i > 0 and keys[i - 1] == key
        assert answer(got) == fresh[key]["P_warm" if warm else "P"], (selection, key)
        assert (got["timings"]["cache_n"] > 0) == warm
    # Two adapters at once: llama.cpp adds their products in its hash-map order, so the sum can round
    # differently from another process's; the same tokens, logprobs equal to float rounding.
    text, steps = answer(managed.complete(P, adapter={"poem": 1.0, "sql": 1.0}, n_predict=4, n_probs=3,
                                          temperature=0))
    ref_text, ref_steps = fresh["both"]["P"]
    assert text == ref_text
    for step, ref in zip(steps, ref_steps):
        assert [t for t, _ in step] == [t for t, _ in ref]
        assert max(abs(a - b) for (_, a), (_, b) in zip(step, ref)) < 1e-3
    managed.use("poem")  # adapter=None: the server's global selection, sent explicitly
    assert answer(managed.complete(P, n_predict=4, n_probs=3, temperature=0)) == fresh["poem"]["P"]
    managed.use({})


def test_chat_with_adapter(managed):
    msgs = [{"role": "user", "content": "Write a poem"}]
    a = managed.chat(msgs, adapter="poem", max_tokens=6, temperature=0)["choices"][0]["message"]["content"]
    b = managed.chat(msgs, adapter={}, max_tokens=6, temperature=0)["choices"][0]["message"]["content"]
    assert a and b and a != b


def test_adapter_names_ids_and_unknown(managed):
    assert managed.props()["total_slots"] == 1
    assert managed.scales("sql") == {0: 0.0, 1: 1.0}
    assert managed.scales({"poem": 0.25, 1: 0.5}) == {0: 0.25, 1: 0.5}
    assert managed.scales(["poem.gguf"]) == {0: 1.0, 1: 0.0}
    with pytest.raises(InputError, match=r"^No adapter named 'chess' on the server\. It has: poem, sql\."):
        managed.complete(P, adapter="chess")
    with pytest.raises(InputError, match="No adapter named 7"):
        managed.use({7: 1.0})


def test_api_key(chat_model, tmp_path):
    base, adapters = chat_model
    with ManagedServer(base, adapters, api_key="s3cret", extra_args=["-c", "256"], log=tmp_path / "l") as client:
        assert [a.name for a in client.adapters()] == ["poem", "sql"]
        with pytest.raises(ServerError, match=r"refused GET /lora-adapters \(401 unauthorized\)\. Invalid API Key\. "
                                              r"Pass the key the server was started with"):
            LlamaServer(client.url).adapters()


def test_managed_server_stops_cleanly(chat_model, tmp_path):
    base, adapters = chat_model
    server = ManagedServer(base, adapters, extra_args=["-c", "256"], log=tmp_path / "l")
    client = server.start()
    assert client.ready()
    server.close()
    assert server.proc.returncode == 0  # SIGTERM: llama-server shuts down in order
    with pytest.raises(ServerError, match="connection was refused"):
        client.adapters()
