"""The router (`gguf-lora serve`) against the real pinned llama-server, spoken to by the official OpenAI SDK.

References we did not write: transformers + peft for the numbers (greedy tokens and top-k log-probabilities,
as tests/test_parity.py measures them), and a fresh llama-server with one adapter on its command line for
"the adapter's solo answer". One router (and so one llama-server, 3 slots, prompt cache on) serves the module.
"""
from __future__ import annotations

import json
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
import tiny
import torch
from llamacpp import Server

from gguf_lora.errors import InputError
from gguf_lora.runtime.router import RouteError, Router, model_name, parse_model

KEY = "router-test-key"
# The numerics of tests/llamacpp.Server (f32 KV cache, no flash attention), with 3 parallel slots.
EXACT = ["-c", "2048", "-np", "3", "-t", "2", "--cache-type-k", "f32", "--cache-type-v", "f32", "--flash-attn", "off"]
TOL = 1e-2  # tests/test_parity.py's tolerance for f16 adapter files
MESSAGES = [{"role": "user", "content": "abc def gh ij"}]
# A long prompt of the tiny vocabulary's words (~200 tokens: the tiny model has 256 positions).
LONG = " ".join(random.Random(5).choice(["abc", "def", "gh", "ij", "kl", "a", "bc", "fed"]) for _ in range(100))


@pytest.fixture(scope="module")
def router(chat_model, tmp_path_factory):
    base, adapters = chat_model
    log = tmp_path_factory.mktemp("router") / "llama-server.log"
    with Router(base, adapters, port=0, api_key=KEY, extra_args=EXACT, log=log, watch=None) as r:
        yield r


@pytest.fixture(scope="module")
def sdk(router):
    return openai.OpenAI(base_url=router.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def native(router, method: str, path: str, **kw) -> requests.Response:
    return requests.request(method, router.url + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=60, **kw)


# ---- the model syntax --------------------------------------------------------------------------------------

def test_model_syntax():
    names, bases = ["sql", "style", "a+b"], ["base"]
    assert parse_model("sql", names, bases) == {"sql": 1.0}
    assert parse_model("base", names, bases) == {}
    assert parse_model("sql@0.5+style", names, bases) == {"sql": 0.5, "style": 1.0}
    assert parse_model("style@-1", names, bases) == {"style": -1.0}
    assert parse_model("a+b", names, bases) == {"a+b": 1.0}  # an exact name wins over the mix syntax
    for bad, status, text in [("chess", 404, "the model 'chess' does not exist; this server has: base, sql, style"),
                              ("sql+chess", 404, "names 'chess', which is not an adapter here"),
                              ("sql@lots", 400, "'lots' is not a scale; write NAME@SCALE, e.g. sql@0.5"),
                              ("sql@nan", 400, "'nan' is not a scale"),
                              ("sql+sql@2", 400, "names adapter 'sql' twice")]:
        with pytest.raises(RouteError) as e:
            parse_model(bad, names, bases)
        assert e.value.status == status and text in e.value.message, (bad, e.value.message)
    for selection in [{}, {"sql": 1.0}, {"sql": 0.5, "style": 1.0}, {"style": -0.25}]:
        assert parse_model(model_name(selection, "base"), names, bases) == selection
    assert model_name({"sql": 0.0}, "base") == "base"


# ---- the OpenAI SDK against PyTorch + PEFT ------------------------------------------------------------------

def reference_model(chat_model, model: str):
    base, _ = chat_model
    hf, peft = base.parent / "hf", base.parent / "peft"
    if model == "base":
        return tiny.load_base_model(hf)
    name, _, scale = model.partition("@")
    m = tiny.load_peft_model(hf, peft / name)
    if scale:
        for module in m.modules():
            if hasattr(module, "set_scale") and hasattr(module, "scaling"):
                module.set_scale("default", float(scale))
    return m


def compare(prompt_ids: list[int], steps: list[dict], model, banned: list[int] = ()) -> float:
    """tests/test_parity.py's measure: |Δ logprob| over llama.cpp's top-k at each step, greedy = PyTorch's argmax
    (among the tokens not banned by logit_bias; llama-server reports log-probabilities before any bias)."""
    ids = prompt_ids + [s["id"] for s in steps]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)[len(prompt_ids) - 1:]
    allowed = ref.clone()
    allowed[:, list(banned)] = -torch.inf
    worst = 0.0
    for i, step in enumerate(steps):
        for top in step["top_logprobs"]:
            worst = max(worst, abs(top["logprob"] - ref[i, top["id"]].item()))
        assert step["id"] not in banned and ref[i, step["id"]].item() >= allowed[i].max().item() - TOL, \
            f"step {i}: not PyTorch's argmax"
    assert worst <= TOL, f"max |Δ logprob| = {worst:.3g}"
    return worst


def upper_bytes(router) -> list[int]:
    """The tiny vocabulary's byte tokens 0x80-0xff. A reply made of them can end in the middle of a UTF-8
    character; llama-server then folds tokens into one logprobs entry, so the chat test bans them."""
    c2, x80 = native(router, "POST", "/tokenize", json={"content": "\u0080"}).json()["tokens"][-2:]
    assert c2 - x80 == 0xC2 - 0x80
    return list(range(x80, x80 + 128))


def chat_prompt_ids(router) -> list[int]:
    """The token ids llama-server runs for MESSAGES (its own template and tokenizer, asked through the router)."""
    prompt = native(router, "POST", "/apply-template", json={"messages": MESSAGES}).json()["prompt"]
    return native(router, "POST", "/tokenize", json={"content": prompt, "add_special": True,
                                                     "parse_special": True}).json()["tokens"]


def steps_of(logprobs_content) -> list[dict]:
    return [c.model_dump() for c in logprobs_content]


def test_sdk_lists_models(sdk):
    assert [m.id for m in sdk.models.list()] == ["base", "poem", "sql"]
    assert sdk.models.list().data[1].model_dump()["parent"] == "base"
    assert sdk.models.retrieve("sql").id == "sql"
    with pytest.raises(openai.NotFoundError, match="the model 'chess' does not exist"):
        sdk.models.retrieve("chess")


@pytest.mark.parametrize("model", ["sql", "poem", "base", "sql@0.5"])
def test_sdk_chat_matches_peft(router, sdk, chat_model, model):
    """Non-streamed and streamed chat through the SDK: PEFT's greedy tokens and log-probabilities."""
    banned = upper_bytes(router)
    ask = dict(model=model, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3,
               logit_bias={str(i): -100 for i in banned})
    done = sdk.chat.completions.create(**ask)
    assert done.model == model and done.choices[0].message.content is not None
    steps = steps_of(done.choices[0].logprobs.content)
    assert len(steps) == 4 == done.usage.completion_tokens
    prompt = chat_prompt_ids(router)
    assert len(prompt) == done.usage.prompt_tokens
    compare(prompt, steps, reference_model(chat_model, model), banned)

    chunks = list(sdk.chat.completions.create(**ask, stream=True))
    assert {c.model for c in chunks} == {model}
    streamed = [s for c in chunks if c.choices and c.choices[0].logprobs
                for s in steps_of(c.choices[0].logprobs.content)]
    assert [s["id"] for s in streamed] == [s["id"] for s in steps]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == done.choices[0].message.content
    for a, b in zip(streamed, steps):  # the same numbers, up to a warm prompt cache's rounding
        assert max(abs(x["logprob"] - y["logprob"]) for x, y in zip(a["top_logprobs"], b["top_logprobs"])) < 1e-4


def test_sdk_completions_with_token_prompt(sdk, chat_model):
    """/v1/completions with a token-id prompt, as the parity suite feeds llama-server, through the SDK."""
    prompt = [1, 17, 33, 54, 70, 91, 12, 8, 44, 101]
    for stream in (False, True):
        got = sdk.completions.create(model="poem", prompt=prompt, max_tokens=4, temperature=0, logprobs=3,
                                     stream=stream)
        chunks = list(got) if stream else [got]
        steps = [s for c in chunks for s in (c.choices[0].model_dump().get("logprobs") or {}).get("content", [])]
        assert len(steps) == 4, chunks[-1]
        compare(prompt, steps, reference_model(chat_model, "poem"))


# ---- the stale-cache trap -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def solo(chat_model, tmp_path_factory):
    """Each adapter's answer to LONG from a fresh llama-server with only that adapter (no switching, cold cache)."""
    base, adapters = chat_model
    log = tmp_path_factory.mktemp("solo")
    out = {}
    for name in ("sql", "poem", "base"):
        s = Server(base, [] if name == "base" else [adapters / f"{name}.gguf"], log / f"{name}.log")
        try:
            r = requests.post(s.url + "/completion", json={"prompt": LONG, "n_predict": 6, "n_probs": 3,
                                                          "temperature": 0, "cache_prompt": False}, timeout=60)
            out[name] = answer(r.json())
        finally:
            s.stop()
    assert len({repr(a[0]) for a in out.values()}) == 3
    return out


def answer(doc: dict) -> tuple:
    return [s["id"] for s in doc["completion_probabilities"]], [[t["logprob"] for t in s["top_logprobs"]]
                                                                for s in doc["completion_probabilities"]]


# Concurrent requests share llama.cpp's batches and KV cache cells with other sequences, which changes the
# summation order of attention (measured up to 5.9e-4 in log-probability under load, same tokens); one request
# at a time stays within 1e-4 of the solo answer. A stale or wrong adapter moves them by far more (the controls).
BATCH_TOL = 5e-3


def same(got: tuple, ref: tuple, tol: float = 1e-4) -> bool:
    """The same greedy tokens, log-probabilities equal up to summation order (batch layout, warm cache)."""
    return got[0] == ref[0] and all(abs(a - b) <= tol for x, y in zip(got[1], ref[1]) for a, b in zip(x, y))


def via_router(router, model: str) -> tuple:
    """LONG as any client sends it: `model`, no `lora`, prompt cache on (llama-server's default)."""
    r = native(router, "POST", "/completion", json={"model": model, "prompt": LONG, "n_predict": 6, "n_probs": 3,
                                                   "temperature": 0})
    assert r.status_code == 200, r.text
    return answer(r.json()), r.json()["timings"]["cache_n"]


def test_stale_cache_trap_is_closed(router, solo):
    """A, then B, then A on the same long prompt with caching on, then many concurrent clients: every answer is
    the adapter's solo answer. Without the router the same sequence returns KV computed under the other adapter."""
    got, _ = via_router(router, "sql")
    assert same(got, solo["sql"])
    warm, cached = via_router(router, "sql")
    assert cached > 100 and same(warm, solo["sql"])  # the prompt cache is on and used
    for name in ["poem", "sql", "base", "sql", "poem"]:
        assert same(via_router(router, name)[0], solo[name]), name

    jobs = [name for name in ("sql", "poem", "base") for _ in range(6)]
    random.Random(1).shuffle(jobs)
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda n: (n, via_router(router, n)[0]), jobs))
    assert [n for n, got in results if not same(got, solo[n], BATCH_TOL)] == []

    # the control: the same sequence sent straight to llama-server, the second adapter chosen the way a
    # client of the global switch does (no `lora`), reuses the first adapter's KV and answers wrongly
    b = router.backend
    direct = lambda body: requests.post(b.url + "/completion", headers=b.headers, timeout=60, json={  # noqa: E731
        "prompt": LONG, "n_predict": 6, "n_probs": 3, "temperature": 0, "id_slot": 0, **body}).json()
    ids = {a.name: a.id for a in b.adapters}
    assert same(answer(direct({"lora": [{"id": ids["sql"], "scale": 1.0}]})), solo["sql"])
    requests.post(b.url + "/lora-adapters", headers=b.headers, json=[{"id": ids["poem"], "scale": 1.0}],
                  timeout=10).raise_for_status()
    try:
        stale = answer(direct({}))
        assert not same(stale, solo["poem"], BATCH_TOL) and not same(stale, solo["sql"], BATCH_TOL)
        # worse: the slot now believes its (sql) KV is poem's, so even an explicit poem list reuses it. This is
        # why llama-server sits on a private port with its own key: every request must come through the router.
        assert not same(answer(direct({"lora": [{"id": ids["poem"], "scale": 1.0}]})), solo["poem"], BATCH_TOL)
    finally:
        requests.post(b.url + "/lora-adapters", headers=b.headers, json=[], timeout=10).raise_for_status()
        direct({"lora": [{"id": ids["sql"], "scale": 1.0}]})  # another list clears slot 0's poisoned cache
    assert same(via_router(router, "poem")[0], solo["poem"])


# ---- streaming, errors, keys --------------------------------------------------------------------------------

class SlowBackend:
    """A stand-in for llama-server's streaming answer, to watch the router in the middle of a stream: it sends one
    event, waits for `release`, then `flood` bytes of events (or small events until the client is gone)."""

    def __init__(self, flood: int = 0):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.release, self.gone, self.sent, self.flood = threading.Event(), threading.Event(), 0, flood
        me = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                event = b'data: {"model":"fake","choices":[{"text":"' + b"x" * 1000 + b'"}]}\n\n'
                try:
                    self.wfile.write(event)
                    self.wfile.flush()
                    me.release.wait(20)
                    while me.flood == 0 or me.sent < me.flood:
                        self.wfile.write(event)
                        self.wfile.flush()
                        me.sent += len(event)
                        if me.flood == 0:
                            time.sleep(0.01)
                    self.wfile.write(b"data: [DONE]\n\n")
                except OSError:
                    me.gone.set()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.proc = self  # the router's monitor polls backend.server.proc
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def poll(self):
        return None

    def log_tail(self, lines=40):
        return ""

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def slow(chat_model, request):
    from gguf_lora.runtime.router import Backend

    fake = SlowBackend(flood=getattr(request, "param", 0))
    r = Router(chat_model[0], [], port=0, watch=None)
    r._start_backend = lambda files, initial=False: Backend(fake, [], "fake", {})
    with r:
        yield r, fake


def test_stream_passes_events_as_they_come(slow):
    r, fake = slow
    with requests.post(r.url + "/v1/completions", json={"model": "base", "stream": True}, stream=True,
                       timeout=10) as resp:
        lines = resp.iter_lines()
        first = next(lines)
        assert json.loads(first[6:])["model"] == "base"  # renamed to what the client asked for
        assert not fake.release.is_set()  # it came through while the answer is still being written
        fake.release.set()
        assert next(lines) == b"" and json.loads(next(lines)[6:])["model"] == "base"


@pytest.mark.parametrize("slow", [256 * 2**20], indirect=True)
def test_stream_backpressure(slow):
    """A client that does not read holds llama-server's writes back: the router buffers at most a little."""
    r, fake = slow
    with requests.post(r.url + "/v1/completions", json={"model": "base", "stream": True}, stream=True,
                       timeout=30) as resp:
        fake.release.set()
        time.sleep(1.5)
        held = fake.sent
        assert held < 64 * 2**20, f"{held / 2**20:.0f} MiB went out while nobody read"
        got = sum(len(c) for c in resp.iter_content(2**20))
    assert got > fake.flood


def test_stream_ends_upstream_when_the_client_leaves(slow):
    r, fake = slow
    resp = requests.post(r.url + "/v1/completions", json={"model": "base", "stream": True}, stream=True, timeout=10)
    next(resp.iter_lines())
    fake.release.set()
    resp.close()  # the client leaves; llama-server stops generating when its connection closes
    assert fake.gone.wait(10)


def test_openai_errors(router, sdk):
    with pytest.raises(openai.NotFoundError) as e:
        sdk.chat.completions.create(model="chess", messages=MESSAGES, max_tokens=2)
    assert e.value.body == {"message": "the model 'chess' does not exist; this server has: base, poem, sql (a mix: "
                                       "NAME@SCALE+NAME, e.g. poem@0.5)", "type": "invalid_request_error",
                            "param": "model", "code": "model_not_found"}
    r = native(router, "POST", "/v1/chat/completions", json={"messages": MESSAGES})
    assert r.status_code == 404 and r.json()["error"]["message"].startswith("no model was given; this server has: base")
    with pytest.raises(openai.BadRequestError, match="'x' is not a scale"):
        sdk.chat.completions.create(model="sql@x", messages=MESSAGES, max_tokens=2)
    # llama-server's own reasons come through, in OpenAI's shape
    with pytest.raises(openai.BadRequestError) as e:
        sdk.completions.create(model="sql", prompt=LONG * 10, max_tokens=2)
    assert "exceeds the available context size" in e.value.body["message"]
    r = native(router, "POST", "/v1/chat/completions", json={"model": "sql", "messages": "hi"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "Expected 'messages' to be an array"
    r = native(router, "POST", "/v1/chat/completions", data=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("the request body is not JSON")
    r = native(router, "POST", "/completion", json={"prompt": "a", "lora": [{"id": 7, "scale": 1}]})
    assert r.status_code == 400 and r.json()["error"]["message"] == ("'lora' entry {'id': 7, 'scale': 1} names no "
                                                                     "adapter here; ids: 0=poem, 1=sql")
    r = native(router, "POST", "/v1/messages", json={"model": "sql", "messages": MESSAGES, "max_tokens": 2})
    assert r.status_code == 501 and "without their `lora` field" in r.json()["error"]["message"]
    assert native(router, "GET", "/nowhere").json() == {"error": {"message": "File Not Found", "param": None,
                                                                  "type": "not_found_error", "code": 404}}


def test_llama_server_drops_lora_on_anthropic_messages(router):
    """llama.cpp bug the router works around (it answers /v1/messages with 501): llama-server converts an
    Anthropic request into a chat request without its `lora` field, so the answer is the global selection's."""
    b = router.backend
    ids = {a.name: a.id for a in b.adapters}
    ask = {"messages": MESSAGES, "max_tokens": 4, "temperature": 0}

    def direct(path: str, lora: list) -> str:
        doc = requests.post(b.url + path, headers=b.headers, json={**ask, "lora": lora}, timeout=60).json()
        return doc["content"][0]["text"] if path == "/v1/messages" else doc["choices"][0]["message"]["content"]

    sql = [{"id": ids["sql"], "scale": 1.0}]
    base = [{"id": i, "scale": 0.0} for i in ids.values()]
    assert direct("/v1/chat/completions", sql) != direct("/v1/chat/completions", base)
    assert direct("/v1/messages", sql) == direct("/v1/chat/completions", base)  # sql was asked for, base answered


def test_native_lora_field_and_endpoints_pass_through(router, solo):
    ids = {a.name: a.id for a in router.backend.adapters}
    r = native(router, "POST", "/completion", json={"prompt": LONG, "n_predict": 6, "n_probs": 3, "temperature": 0,
                                                   "lora": [{"id": ids["poem"], "scale": 1.0}]})
    assert same(answer(r.json()), solo["poem"])
    assert native(router, "GET", "/props").json()["total_slots"] == 3
    assert native(router, "POST", "/tokenize", json={"content": "abc"}).json()["tokens"]


def test_api_key_at_the_front_and_a_private_key_behind(router, sdk):
    bad = openai.OpenAI(base_url=router.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="Invalid API Key"):
        bad.models.list()
    assert requests.get(router.url + "/v1/models", headers={"X-Api-Key": KEY}, timeout=10).status_code == 200
    assert requests.get(router.url + "/health", timeout=10).json() == {"status": "ok"}  # public, as llama-server's
    b = router.backend
    assert b.url.startswith("http://127.0.0.1:")
    for key in (None, KEY):  # llama-server takes neither no key nor the public one
        r = requests.get(b.url + "/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=10)
        assert r.status_code == 401


def test_router_input_errors(chat_model, tmp_path):
    base, adapters = chat_model
    with pytest.raises(InputError, match="--slot-save-path cannot be passed through.*restored slot"):
        Router(base, adapters, port=0, extra_args=["--slot-save-path", str(tmp_path)])
    with pytest.raises(InputError, match="policy 'maybe' is not one of error, selection"):
        Router(base, adapters, port=0, unknown_model="maybe")
    (tmp_path / "base.gguf").write_bytes((adapters / "sql.gguf").read_bytes())
    with pytest.raises(InputError, match="Adapter 'base' has the base model's name"):
        Router(base, [adapters, tmp_path / "base.gguf"], port=0)


def test_a_dying_llama_server_is_fatal(chat_model, tmp_path):
    base, adapters = chat_model
    r = Router(base, adapters, port=0, extra_args=["-c", "256"], log=tmp_path / "log", watch=None).start()
    try:
        r.backend.server.proc.send_signal(signal.SIGKILL)
        r._thread.join(10)
        assert not r._thread.is_alive()
        assert str(r._error).startswith("llama-server stopped unexpectedly with exit code -9.")
        with pytest.raises(requests.ConnectionError):
            requests.get(r.url + "/health", timeout=2)
    finally:
        r.stop()


def test_adapter_folder_changes_restart_llama_server_without_failing_a_request(chat_model, tmp_path):
    """Added, refused and removed adapter files are picked up; requests meanwhile are held, none fails."""
    from test_runtime_cli import retag

    base, adapters = chat_model
    folder = tmp_path / "adapters"
    folder.mkdir()
    (folder / "sql.gguf").write_bytes((adapters / "sql.gguf").read_bytes())
    events: list[str] = []
    r = Router(base, folder, port=0, watch=0.2, notify=events.append, extra_args=["-c", "256", "-t", "2"],
               log=tmp_path / "llama-server.log")
    ask = {"messages": MESSAGES, "max_tokens": 3, "temperature": 0}

    def models():
        return [m["id"] for m in requests.get(r.url + "/v1/models", timeout=60).json()["data"]]

    def until(want):
        deadline = time.monotonic() + 60
        while models() != want:
            assert time.monotonic() < deadline, (models(), events)
            time.sleep(0.1)

    with r:
        statuses, stop = [], threading.Event()

        def client():
            while not stop.is_set():
                statuses.append(requests.post(r.url + "/v1/chat/completions", json={"model": "sql", **ask},
                                              timeout=60).status_code)

        worker = threading.Thread(target=client)
        worker.start()
        try:
            time.sleep(0.3)
            (folder / "poem.gguf").write_bytes((adapters / "poem.gguf").read_bytes())
            until(["base", "poem", "sql"])
            retag(adapters / "sql.gguf", folder / "other.gguf", "qwen2")  # llama-server refuses this one
            deadline = time.monotonic() + 60
            while not any(e.startswith("left out adapter other.gguf") for e in events):
                assert time.monotonic() < deadline, events
                time.sleep(0.1)
            time.sleep(0.5)
        finally:
            stop.set()
            worker.join()
        assert statuses and set(statuses) == {200}, statuses  # the client ran right through both restarts
        assert models() == ["base", "poem", "sql"] and r.restarts == 2
        assert "Model arch and LoRA arch mismatch" in next(e for e in events if e.startswith("left out"))
        poem = requests.post(r.url + "/v1/chat/completions", json={"model": "poem", **ask}, timeout=60)
        assert poem.status_code == 200 and poem.json()["model"] == "poem"
        (folder / "sql.gguf").unlink()
        until(["base", "poem"])
        gone = requests.post(r.url + "/v1/chat/completions", json={"model": "sql", **ask}, timeout=60)
        assert gone.status_code == 404 and "this server has: base, poem" in gone.json()["error"]["message"]


def test_the_http_stack_loads_only_for_serve():
    import subprocess
    import sys

    code = "import sys, gguf_lora, gguf_lora.cli; print(sorted(m for m in ('aiohttp', 'openai') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout == "[]\n"
