"""One HTTP layer for the runtime clients: bounded waits and one clear error for every way a call can fail.

requests' own exceptions never escape: each becomes a ServerError that names the server, the call, what
went wrong and what to do about it. Every call has a total deadline (connect, send, headers and body, or a
whole stream), not only requests' per-read timeout, and answers are size-bounded before they are parsed.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import requests
import requests.adapters
import urllib3
import urllib3.connection
import urllib3.exceptions

from ..errors import ServerError, ServerUnreachable, brief

CONNECT_TIMEOUT = 5.0
MAX_BODY = 64 * 2**20  # a JSON answer or one streamed line larger than this is not one we asked for
UPLOAD_RATE = 2**20  # bytes/s: an upload's deadline grows by its size at this rate (a 4 GB model: +68 min)


class _Deadline:
    """The total time one call may take. requests' timeout is per socket read, so a server that trickles a
    byte every few seconds would hold a call forever; at the deadline this shuts the call's socket down, which
    ends any read at once (as an error the call then reports as the deadline)."""

    def __init__(self, seconds: float):
        self.seconds, self.fired, self._socks = seconds, False, []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self) -> "_Deadline":
        _current.deadline = self
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        _current.deadline = None

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            if self.fired:
                _shutdown(sock)
            else:
                self._socks.append(sock)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            for sock in self._socks:
                _shutdown(sock)

    def cancel(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._socks.clear()


_current = threading.local()


def _shutdown(sock: socket.socket) -> None:
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's method: TLS state is left alone
    except (OSError, TypeError):
        pass


def _watch(conn) -> None:
    """Register the connection's socket (not the connection: http.client drops conn.sock while the answer
    of a closing connection is still being read from it)."""
    deadline = getattr(_current, "deadline", None)
    sock = getattr(conn, "sock", None)
    if deadline is not None and sock is not None:
        deadline.watch(sock)


class _Conn(urllib3.connection.HTTPConnection):
    def connect(self):
        super().connect()
        _watch(self)

    def request(self, *args, **kwargs):
        _watch(self)  # a kept-alive connection is reused without connect(); a new one registers in connect()
        return super().request(*args, **kwargs)


class _TLSConn(urllib3.connection.HTTPSConnection):
    def connect(self):
        super().connect()
        _watch(self)

    def request(self, *args, **kwargs):
        _watch(self)
        return super().request(*args, **kwargs)


class _Pool(urllib3.HTTPConnectionPool):
    ConnectionCls = _Conn


class _TLSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _TLSConn


class _Adapter(requests.adapters.HTTPAdapter):
    """requests' adapter with connections the current call's deadline can shut down."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}


def server_message(response: requests.Response) -> str:
    """The error text a server put in its body: llama-server {"error":{"message"}}, Ollama {"error": "..."}."""
    try:
        body = json.loads(response.content)
    except (ValueError, RecursionError):
        return response.text.strip()[:200]
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            err = err.get("message", err)
        return brief(err, 300, quote=False)
    return brief(body, 200, quote=False)


class Http:
    """A base URL plus headers; every call has a total deadline and maps failures to ServerError."""

    def __init__(self, url: str, name: str, headers: dict | None = None, timeout: float = 120.0,
                 auth_fix: str = "pass the right API key"):
        if not url.startswith(("http://", "https://")):
            url = "http://" + url
        self.url, self.name, self.timeout, self.auth_fix = url.rstrip("/"), name, timeout, auth_fix
        self.session = requests.Session()
        self.session.mount("http://", _Adapter())
        self.session.mount("https://", _Adapter())
        self.session.headers.update(headers or {})
        self.session.trust_env = False  # a proxy from the environment must not see loopback model traffic

    def request(self, method: str, path: str, *, ok: tuple[int, ...] = (200,), timeout: float | None = None,
                stream: bool = False, **kwargs) -> requests.Response:
        """One call, answer included, within `timeout` seconds in total (an upload gets more time by its
        size). stream=True: the answer is read later (ndjson), still within the same deadline."""
        call = f"{method} {path}"
        wait = self.timeout if timeout is None else timeout
        total = wait + _upload_size(kwargs.get("data")) / UPLOAD_RATE
        deadline = _Deadline(total)
        try:
            with deadline:
                r = self.session.request(method, self.url + path, timeout=(min(CONNECT_TIMEOUT, wait), wait),
                                         stream=True, **kwargs)
                if not stream or r.status_code not in ok:
                    _read_body(r, self, call)
                if deadline.fired:  # an answer without a length "ends" where the deadline shut the socket
                    raise requests.exceptions.ReadTimeout("the deadline passed")
        except requests.exceptions.RequestException as e:
            deadline.cancel()
            raise self._failure(e, call, wait, deadline) from None
        except BaseException:
            deadline.cancel()
            raise
        if stream and r.status_code in ok:
            r._gguf_lora_deadline = deadline  # ndjson cancels it when the stream ends
        else:
            deadline.cancel()
        if r.status_code in ok:
            return r
        msg = server_message(r)
        r.close()
        if r.status_code in (401, 403):
            raise ServerError(f"{self.name} at {self.url} refused {call} ({r.status_code} unauthorized)", msg,
                              self.auth_fix, status=r.status_code)
        if r.status_code == 503:
            raise ServerError(f"{self.name} at {self.url} is not ready (503)", msg, "wait until it has loaded",
                              status=503)
        kind = "rejected" if r.status_code < 500 else "failed"
        raise ServerError(f"{self.name} {kind} {call} ({r.status_code})", msg,
                          "check the request" if r.status_code < 500 else "check the server's log",
                          status=r.status_code)

    def _failure(self, e: Exception, call: str, wait: float, deadline: _Deadline) -> ServerError:
        if deadline.fired or isinstance(e, requests.exceptions.ReadTimeout) or _timed_out(e):
            return ServerError(f"{self.name} at {self.url} did not answer {call} within "
                               f"{deadline.seconds if deadline.fired else wait:g} s",
                               "it is busy, stuck or overloaded", "retry, or give it a longer timeout")
        if isinstance(e, requests.exceptions.ConnectTimeout):
            return ServerError(f"Cannot reach {self.name} at {self.url}", f"connecting timed out after "
                               f"{min(CONNECT_TIMEOUT, wait):g} s", "check the address and that the server runs")
        if isinstance(e, requests.exceptions.ConnectionError) and _is_refused(e):
            return ServerUnreachable(f"Cannot reach {self.name} at {self.url}", "the connection was refused: "
                                     "nothing listens there", "start the server or pass the right --url")
        malformed = _malformed(e)
        if malformed is not None:
            return ServerError(f"{self.name} at {self.url} answered {call} with malformed HTTP",
                               malformed, f"check that {self.url} is really {self.name}")
        if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError)):
            return ServerError(f"The connection to {self.name} at {self.url} broke during {call}",
                               f"{_root(e)} (did the server stop or crash?)", "check the server's log and retry")
        return ServerError(f"{call} to {self.name} at {self.url} failed", _root(e), "check the address")

    def json(self, method: str, path: str, **kwargs) -> Any:
        r = self.request(method, path, **kwargs)
        try:
            return json.loads(r.content)
        except RecursionError:
            raise ServerError(f"{self.name} answered {method} {path} with JSON nested too deeply", "no answer of "
                              "its API nests like that", f"check that {self.url} is really {self.name}") from None
        except ValueError:
            raise ServerError(f"{self.name} answered {method} {path} with something that is not JSON",
                              f"it began {r.content[:60].decode('utf-8', 'replace')!r}",
                              f"check that {self.url} is really {self.name}") from None

    def ndjson(self, method: str, path: str, **kwargs) -> Iterator[dict]:
        """Stream newline-delimited JSON; an {"error": ...} line anywhere in the stream raises. The whole
        stream shares the call's deadline."""
        call = f"{method} {path}"
        r = self.request(method, path, stream=True, **kwargs)
        deadline: _Deadline = getattr(r, "_gguf_lora_deadline", None) or _Deadline(0)
        try:
            for line in _lines(r, self, call, deadline):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except (ValueError, RecursionError):
                    raise ServerError(f"{self.name} streamed a line that is not JSON during {call}",
                                      f"it began {line[:60].decode('utf-8', 'replace')!r}",
                                      f"check that {self.url} is really {self.name}")
                if not isinstance(doc, dict):
                    raise ServerError(f"{self.name} streamed {brief(doc, 80)} during {call}", "expected a JSON object",
                                      f"check that {self.url} is really {self.name}")
                if "error" in doc:
                    raise ServerError(f"{self.name} reported an error during {call}",
                                      brief(doc["error"], 300, quote=False),
                                      "nothing was finished; fix the cause and run it again")
                yield doc
            if deadline.fired:
                raise requests.exceptions.ReadTimeout("the deadline passed")
        except requests.exceptions.RequestException as e:
            if deadline.fired:
                raise ServerError(f"{self.name} at {self.url} did not finish {call} within {deadline.seconds:g} s",
                                  "it is busy, stuck or overloaded", "retry, or give it a longer timeout") from None
            raise ServerError(f"The stream from {self.name} broke during {call}", _root(e),
                              "check the server's log and retry") from None
        finally:
            deadline.cancel()
            r.close()


def _upload_size(data: Any) -> int:
    try:
        return os.fstat(data.fileno()).st_size if hasattr(data, "fileno") else len(data or b"")
    except (OSError, TypeError, ValueError):
        return 0


def _read_body(r: requests.Response, http: Http, call: str) -> None:
    """Read the whole answer now (under the deadline), refusing one larger than MAX_BODY."""
    body = bytearray()
    for chunk in r.iter_content(65536):
        body += chunk
        if len(body) > MAX_BODY:
            r.close()
            raise ServerError(f"{http.name} at {http.url} answered {call} with more than {MAX_BODY // 2**20} MiB",
                              "no answer of its API is that large", f"check that {http.url} is really {http.name}")
    r._content = bytes(body)
    r._content_consumed = True


def _lines(r: requests.Response, http: Http, call: str, deadline: _Deadline) -> Iterator[bytes]:
    """The stream's lines, each bounded by MAX_BODY (iter_lines would buffer an endless line whole)."""
    pending = b""
    for chunk in r.iter_content(65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from lines
        if len(pending) > MAX_BODY:
            raise ServerError(f"{http.name} streamed a line of more than {MAX_BODY // 2**20} MiB during {call}",
                              "no line of its API is that long", f"check that {http.url} is really {http.name}")
    if deadline.fired:  # the stream "ended" where the deadline shut the socket
        raise requests.exceptions.ReadTimeout("the deadline passed")
    if pending:
        yield pending


def _chain(e: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__ or (e.args[0] if e.args and isinstance(e.args[0], BaseException) else None)


def _malformed(e: BaseException) -> str | None:
    """What was wrong when the server's bytes were not HTTP (a bad status line, a header line too long, a
    chunk size that is not a number), as opposed to a connection that broke or was cut off."""
    for x in _chain(e):
        if isinstance(x, (urllib3.exceptions.InvalidChunkLength, urllib3.exceptions.InvalidHeader)):
            return f"{type(x).__name__}: {x}"
        if isinstance(x, (http.client.IncompleteRead, ConnectionError, TimeoutError)):
            return None
        if isinstance(x, (http.client.HTTPException, ValueError)):
            text = str(x).strip() or type(x).__name__
            return f"{type(x).__name__}: {text}" if type(x).__name__ not in text else text
    return None


def _timed_out(e: BaseException) -> bool:
    """A read timeout that requests reports as a ConnectionError (one in the middle of the body)."""
    return any(isinstance(x, (urllib3.exceptions.ReadTimeoutError, socket.timeout)) for x in _chain(e))


def _is_refused(e: Exception) -> bool:
    while e is not None:
        if isinstance(e, ConnectionRefusedError):
            return True
        e = e.__cause__ or e.__context__ or (e.args[0] if e.args and isinstance(e.args[0], Exception) else None)
        if hasattr(e, "reason") and isinstance(e.reason, Exception):
            e = e.reason
    return False


def _root(e: Exception) -> str:
    seen = e
    while True:
        nxt = seen.__cause__ or seen.__context__ or getattr(seen, "reason", None)
        if not isinstance(nxt, Exception) or nxt is seen:
            break
        seen = nxt
    text = str(seen) or type(seen).__name__
    return text.split(": ", 1)[-1] if "object at 0x" in text else text
