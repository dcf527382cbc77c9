"""One HTTP layer for the runtime clients: bounded waits and one clear error for every way a call can fail.

requests' own exceptions never escape: each becomes a ServerError that names the server, the call, what
went wrong and what to do about it.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import requests

from ..errors import ServerError, ServerUnreachable

CONNECT_TIMEOUT = 5.0


def server_message(response: requests.Response) -> str:
    """The error text a server put in its body: llama-server {"error":{"message"}}, Ollama {"error": "..."}."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:200]
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            err = err.get("message", err)
        return str(err)[:300]
    return str(body)[:200]


class Http:
    """A base URL plus headers; every call has a deadline and maps failures to ServerError."""

    def __init__(self, url: str, name: str, headers: dict | None = None, timeout: float = 120.0,
                 auth_fix: str = "pass the right API key"):
        if not url.startswith(("http://", "https://")):
            url = "http://" + url
        self.url, self.name, self.timeout, self.auth_fix = url.rstrip("/"), name, timeout, auth_fix
        self.session = requests.Session()
        self.session.headers.update(headers or {})
        self.session.trust_env = False  # a proxy from the environment must not see loopback model traffic

    def request(self, method: str, path: str, *, ok: tuple[int, ...] = (200,), timeout: float | None = None,
                stream: bool = False, **kwargs) -> requests.Response:
        call = f"{method} {path}"
        wait = self.timeout if timeout is None else timeout
        try:
            r = self.session.request(method, self.url + path, timeout=(min(CONNECT_TIMEOUT, wait), wait),
                                     stream=stream, **kwargs)
        except requests.exceptions.ConnectTimeout:
            raise ServerError(f"cannot reach {self.name} at {self.url}", f"connecting timed out after "
                              f"{min(CONNECT_TIMEOUT, wait):g} s", "check the address and that the server runs")
        except requests.exceptions.ReadTimeout:
            raise ServerError(f"{self.name} at {self.url} did not answer {call} within {wait:g} s",
                              "it is busy, stuck or overloaded", "retry, or give it a longer timeout")
        except requests.exceptions.ConnectionError as e:
            if _is_refused(e):
                raise ServerUnreachable(f"cannot reach {self.name} at {self.url}", "the connection was refused: "
                                  "nothing listens there", "start the server or pass the right --url")
            raise ServerError(f"the connection to {self.name} at {self.url} broke during {call}",
                              f"{_root(e)} (did the server stop or crash?)", "check the server's log and retry")
        except requests.exceptions.ChunkedEncodingError as e:  # the answer was cut off
            raise ServerError(f"the connection to {self.name} at {self.url} broke during {call}",
                              f"{_root(e)} (did the server stop or crash?)", "check the server's log and retry")
        except requests.exceptions.RequestException as e:
            raise ServerError(f"{call} to {self.name} at {self.url} failed", _root(e), "check the address")
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

    def json(self, method: str, path: str, **kwargs) -> Any:
        r = self.request(method, path, **kwargs)
        try:
            return json.loads(_body(r, self, f"{method} {path}"))
        except ValueError:
            raise ServerError(f"{self.name} answered {method} {path} with something that is not JSON",
                              f"it began {r.text[:60]!r}", f"check that {self.url} is really {self.name}")

    def ndjson(self, method: str, path: str, **kwargs) -> Iterator[dict]:
        """Stream newline-delimited JSON; an {"error": ...} line anywhere in the stream raises."""
        call = f"{method} {path}"
        r = self.request(method, path, stream=True, **kwargs)
        try:
            for line in r.iter_lines():
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except ValueError:
                    raise ServerError(f"{self.name} streamed a line that is not JSON during {call}",
                                      f"it began {line[:60]!r}", f"check that {self.url} is really {self.name}")
                if not isinstance(doc, dict):
                    raise ServerError(f"{self.name} streamed {doc!r} during {call}", "expected a JSON object",
                                      f"check that {self.url} is really {self.name}")
                if "error" in doc:
                    raise ServerError(f"{self.name} reported an error during {call}", str(doc["error"]),
                                      "nothing was finished; fix the cause and run it again")
                yield doc
        except requests.exceptions.RequestException as e:
            raise ServerError(f"the stream from {self.name} broke during {call}", _root(e),
                              "check the server's log and retry")
        finally:
            r.close()


def _body(r: requests.Response, http: Http, call: str) -> bytes:
    try:
        return r.content
    except requests.exceptions.RequestException as e:
        raise ServerError(f"the connection to {http.name} broke while reading the answer to {call}", _root(e),
                          "check the server's log and retry")


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
