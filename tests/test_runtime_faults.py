"""Every way a server can fail a client is one clear ServerError, with bounded waits: a fake misbehaving server
on loopback, and a real llama-server killed in the middle of a request."""
from __future__ import annotations

import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gguf_lora.errors import ServerError
from gguf_lora.runtime.llama_server import LlamaServer, ManagedServer, free_port


class Misbehaving(BaseHTTPRequestHandler):
    """GET /lora-adapters answers according to the server's `mode`."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        mode = self.server.mode
        if mode == "slow":
            time.sleep(3)
        if mode == "cut":  # headers promise a body that never comes: the server dies mid-answer
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b'[{"id":')
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        status, body = {
            "401": (401, b'{"error":{"message":"Invalid API Key","type":"authentication_error","code":401}}'),
            "503": (503, b'{"error":{"message":"Loading model","type":"unavailable_error","code":503}}'),
            "500": (500, b'{"error":{"message":"something broke inside","code":500}}'),
            "html": (200, b"<html>it works</html>"),
            "shape": (200, b'{"adapters": []}'),
            "slow": (200, b"[]"),
        }[mode]
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET


@pytest.fixture
def fake():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


CASES = {
    "401": r"^llama-server at http://127\.0\.0\.1:\d+ refused GET /lora-adapters \(401 unauthorized\)\. Invalid API "
           r"Key\. Pass the key the server was started with \(--api-key\)\.$",
    "503": r"^llama-server at http://127\.0\.0\.1:\d+ is not ready \(503\)\. Loading model\. Wait until it has loaded\.$",
    "500": r"^llama-server failed GET /lora-adapters \(500\)\. Something broke inside\. Check the server's log\.$",
    "html": r"^llama-server answered GET /lora-adapters with something that is not JSON\. It began '<html>it works"
            r"</html>'\. Check that http://127\.0\.0\.1:\d+ is really llama-server\.$",
    "shape": r"^llama-server's /lora-adapters is not a list\. Got \{'adapters': \[\]\}\. Check the server version\.$",
    "cut": r"^The connection to llama-server at http://127\.0\.0\.1:\d+ broke during GET /lora-adapters\. "
           r"IncompleteRead\(7 bytes read, 993 more expected\) \(did the server stop or crash\?\)\. Check the "
           r"server's log and retry\.$",
    "slow": r"^llama-server at http://127\.0\.0\.1:\d+ did not answer GET /lora-adapters within 1 s\. It is busy, "
            r"stuck or overloaded\. Retry, or give it a longer timeout\.$",
}


@pytest.mark.parametrize("mode", CASES)
def test_each_failure_is_one_clear_error(fake, mode):
    fake.mode = mode
    client = LlamaServer(f"http://127.0.0.1:{fake.server_address[1]}", timeout=1)
    t0 = time.monotonic()
    with pytest.raises(ServerError, match=CASES[mode]):
        client.adapters()
    assert time.monotonic() - t0 < 5


def test_503_forever_is_a_bounded_wait(fake):
    fake.mode = "503"
    client = LlamaServer(f"http://127.0.0.1:{fake.server_address[1]}")
    t0 = time.monotonic()
    with pytest.raises(ServerError, match=r"was not ready after 1\.5 s\. It answered 503 \(still loading the model\)"):
        client.wait_ready(timeout=1.5)
    assert time.monotonic() - t0 < 3


def test_nothing_listening_is_a_bounded_wait():
    client = LlamaServer(f"http://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    with pytest.raises(ServerError, match=r"was not ready after 1 s\. The connection was refused"):
        client.wait_ready(timeout=1)
    assert time.monotonic() - t0 < 3


def test_a_server_that_dies_mid_request(chat_model, tmp_path):
    """A real llama-server, killed while a request is in flight: the request fails at once, clearly.
    (The tiny model answers in milliseconds, so the server is frozen first to hold the request open.)"""
    base, adapters = chat_model
    server = ManagedServer(base, adapters, extra_args=["-c", "256"], log=tmp_path / "log")
    client = server.start()
    try:
        server.proc.send_signal(signal.SIGSTOP)
        threading.Timer(0.5, lambda: server.proc.send_signal(signal.SIGKILL)).start()
        t0 = time.monotonic()
        with pytest.raises(ServerError, match=r"^The connection to llama-server at http://127\.0\.0\.1:\d+ broke during "
                                              r"(GET /lora-adapters|POST /completion)\. .*\(did the server stop or crash\?\)"):
            client.complete("tell me", adapter="sql", n_predict=8)
        assert time.monotonic() - t0 < 10
    finally:
        server.close()
