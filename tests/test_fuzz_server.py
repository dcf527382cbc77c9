"""Fuzzing server answers: a raw socket server on loopback plays generated replies (status lines, headers,
framing, bodies of any JSON shape or none, trickled, cut, reset or left hanging) to the llama-server and Ollama
clients and to `gguf-lora adapters list`.

Property: the call returns what it promises (a list of adapters, a text), or raises one ServerError whose
message is one line; never another exception; and it ends within its deadline (plus a little slack for a
loaded machine), however slowly the server trickles.
"""
from __future__ import annotations

import json
import socket
import struct
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

import fuzz_support as fz
from gguf_lora.errors import ServerError
from gguf_lora.runtime.llama_server import Adapter, LlamaServer
from gguf_lora.runtime.ollama import Ollama

TIMEOUT = 1.0  # the clients' deadline in this suite (the mechanism is the one `adapters list` uses with 30 s)
SLACK = 2.0


class ScriptedServer:
    """Accepts connections and answers each with the current script: [(bytes, delay before)], then
    'close', 'hang' (until the test ends) or 'reset' (RST)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.script: tuple[list[tuple[bytes, float]], str] = ([], "close")
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn, self.script), daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, conn: socket.socket, script):
        chunks, ending = script
        try:
            conn.settimeout(2)
            data = b""
            while b"\r\n\r\n" not in data:
                part = conn.recv(65536)
                if not part:
                    return
                data += part
            for chunk, delay in chunks:
                if delay and self.stop.wait(delay):
                    return
                conn.sendall(chunk)
            if ending == "hang":
                self.stop.wait(30)
            elif ending == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.stop.set()
        self.sock.close()
        for t in self.threads:
            t.join(5)


@pytest.fixture(scope="module")
def server():
    s = ScriptedServer()
    yield s
    s.close()


scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
           | st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
adapter_entries = st.fixed_dictionaries({}, optional={
    "id": st.integers(-2, 5) | json_values, "path": st.sampled_from(["/a/sql.gguf", "poem.gguf", ""]) | json_values,
    "scale": st.floats(-2, 2) | json_values})
bodies = st.one_of(
    st.lists(adapter_entries, max_size=3).map(lambda v: json.dumps(v).encode()),  # mostly the right shape
    st.builds(lambda v: json.dumps(v).encode(), json_values),
    st.integers(100, 100_000).map(lambda d: b"[" * d + b"]" * d),  # nested past the parser's recursion limit
    st.binary(max_size=80),
    st.just(b""),
)


def valid_reply(body: bytes, ending: str = "close"):
    return [(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
             % (len(body), body), 0.0)], ending


@st.composite
def replies(draw, body_strategy=bodies):
    """A whole HTTP answer as chunks with delays, and how the connection ends."""
    body = draw(body_strategy)
    status = draw(st.sampled_from([200, 200, 200, 200, 401, 403, 404, 500, 503, 302, 999]))
    status_line = draw(st.sampled_from([f"HTTP/1.1 {status} X\r\n".encode()] * 4
                                       + [b"HTTP/1.1 abc\r\n", b"garbage\r\n", b"", b"HTTP/1.1 200 OK"]))
    framing = draw(st.sampled_from(["length", "length", "short", "long", "none", "chunked", "bad-chunked"]))
    headers = [b"Content-Type: application/json"] if draw(st.booleans()) else []
    if framing == "length":
        headers.append(b"Content-Length: %d" % len(body))
    elif framing == "short":  # promises more than it sends
        headers.append(b"Content-Length: %d" % (len(body) + draw(st.integers(1, 1000))))
    elif framing == "long":  # promises less: the rest is ignored
        headers.append(b"Content-Length: %d" % max(0, len(body) - draw(st.integers(1, 5))))
    elif framing in ("chunked", "bad-chunked"):
        headers.append(b"Transfer-Encoding: chunked")
        body = (b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if framing == "chunked"
                else b"zz\r\n" + body)
    headers += draw(st.lists(st.sampled_from([b"X-A: b", b"Bad header line", b"Content-Length: x",
                                              b"X-Long: " + b"a" * 70_000]), max_size=2))
    raw = status_line + b"\r\n".join(headers) + b"\r\n\r\n" + body
    pieces = draw(st.sampled_from(["one", "one", "split", "trickle"]))
    if pieces == "one":
        chunks = [(raw, 0.0)]
    elif pieces == "split":
        at = draw(st.integers(0, len(raw)))
        chunks = [(raw[:at], 0.0), (raw[at:], draw(st.sampled_from([0.0, 0.2, 0.7])))]
    else:  # a byte every few hundred ms: per-read timeouts never fire, the deadline must
        head = draw(st.integers(0, len(raw)))
        chunks = [(raw[:head], 0.0)] + [(raw[i:i + 1], 0.25) for i in range(head, min(len(raw), head + 40))]
        chunks.append((raw[head + 40:], 0.0))
    ending = draw(st.sampled_from(["close", "close", "hang", "reset"]))
    return chunks, ending


def _bounded(call):
    t0 = time.monotonic()
    try:
        value, error = call(), None
    except ServerError as e:
        value, error = None, e
    elapsed = time.monotonic() - t0
    assert elapsed < TIMEOUT + SLACK, f"the call took {elapsed:.2f} s (deadline {TIMEOUT} s)"
    if error is not None:
        text = str(error)
        assert "\n" not in text and text.endswith("."), text
    return value, error


@fz.seed_decorator()
@fz.fuzz(120)
@given(script=replies() | st.builds(valid_reply, st.lists(st.fixed_dictionaries(
    {"id": st.integers(0, 9), "path": st.text(max_size=20), "scale": st.floats(-4, 4)})).map(
    lambda v: json.dumps(v).encode()), st.sampled_from(["close", "hang"])))
def test_llama_server_client(server, script):
    server.script = script
    value, error = _bounded(lambda: LlamaServer(server.url, timeout=TIMEOUT).adapters())
    if error is None:
        assert isinstance(value, list) and all(isinstance(a, Adapter) for a in value)
        fz.record("llama-server client: /lora-adapters", "ok")
    else:
        fz.record("llama-server client: /lora-adapters", "refused", str(error))


ndjson_lines = st.lists(st.one_of(
    st.fixed_dictionaries({"response": st.text(max_size=5) | json_values}, optional={"done": st.booleans()}),
    st.fixed_dictionaries({"error": json_values}),
    json_values), max_size=5).map(lambda docs: b"".join(json.dumps(d).encode() + b"\n" for d in docs))
ndjson_bodies = st.one_of(ndjson_lines, ndjson_lines.map(lambda b: b[:-3]), st.binary(max_size=40),
                          st.just(b'{"response":"' + b"a" * 200 + b'","done":true}\n'))


@fz.seed_decorator()
@fz.fuzz(80)
@given(script=replies(ndjson_bodies) | st.builds(valid_reply, st.lists(st.text(max_size=8), max_size=4).map(
    lambda parts: b"".join(json.dumps({"response": p}).encode() + b"\n" for p in parts)
    + b'{"response":"","done":true}\n')))
def test_ollama_streaming_client(server, script):
    server.script = script
    value, error = _bounded(lambda: Ollama(server.url, timeout=TIMEOUT).generate("m", "p"))
    if error is None:
        assert isinstance(value, str)
        fz.record("Ollama client: /api/generate stream", "ok")
    else:
        fz.record("Ollama client: /api/generate stream", "refused", str(error))


@fz.seed_decorator()
@fz.fuzz(60)
@given(script=replies())
def test_adapters_list_cli(server, script):
    """The command a user runs, on answers that come quickly (its own deadline is 30 s)."""
    chunks, ending = script
    server.script = ([(c, 0.0) for c, _ in chunks], "close" if ending == "hang" else ending)
    fz.run_cli("adapters list: server answers", ["adapters", "list", "--url", server.url], wall=10)
