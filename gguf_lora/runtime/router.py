"""An OpenAI-compatible front for llama-server: the adapter is chosen by `model`, and the prompt cache stays on
and exact.

llama-server keeps each slot's KV cache between requests and throws it away when a request's adapter list
differs from what the slot last ran, but only when the request names its adapters: a request without
`lora` reuses KV computed under whatever ran before, and the host-RAM prompt cache (`--cache-ram`) hands KV
between slots by tokens alone. So the router
- runs llama-server on a private loopback port with its own key, prompt cache on, `--cache-ram 0`;
- forwards every generating request with the complete, explicit `lora` list (every adapter, unused ones
  at 0), derived from `model` (`sql`, the base's name, a mix `sql@0.5+style`) or from a `lora` field;
- answers `/v1/models` itself and passes everything else through, streaming as it arrives;
- refuses `/v1/messages`, whose conversion in llama-server drops `lora` (the answer would be computed under
  the global scales on a cache computed under another adapter);
- restarts llama-server when the adapter folders change (llama-server loads adapters only at start),
  holding new requests and letting running ones finish, so that no request fails.

aiohttp is the HTTP stack on both sides (server and client in one well-kept package, with backpressure on
streamed writes). Nothing here prints: events go to the `notify` callback.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from ..errors import GgufLoraError, InputError, ServerError
from .llama_server import OWN_FLAGS, Adapter, ManagedServer, _check_port_free, adapter_files, free_port

# Paths whose requests llama-server turns into generation tasks and which take a `lora` field.
GENERATING = {"/completion", "/completions", "/v1/completions", "/chat/completions", "/v1/chat/completions",
              "/v1/responses", "/responses", "/infill"}
OPENAI = {"/v1/completions", "/v1/chat/completions", "/chat/completions", "/v1/responses", "/responses"}
REFUSED = {"/v1/messages": "llama-server converts Anthropic requests without their `lora` field, so the answer "
                           "would use the global adapter scales on a prompt cache computed under another adapter; "
                           "use /v1/chat/completions"}
PUBLIC = {"/health", "/v1/health"}
HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
       "transfer-encoding", "upgrade", "host", "content-length", "authorization", "x-api-key"}
# Router-only flags: --slot-save-path would let a client restore KV computed under another adapter.
ROUTER_OWN_FLAGS = OWN_FLAGS | {"--slot-save-path"}
UNKNOWN_MODEL = ("error", "selection")
DRAIN_TIMEOUT = 120.0
KEEPALIVE = 3.0  # seconds an idle connection to llama-server is kept (it closes them after 5)

Notify = Callable[[str], None]


class RouteError(Exception):
    """A request the router answers itself with an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.type, self.code, self.param)


def error_response(status: int, message: str, type_: str, code: str | int | None = None,
                   param: str | None = None) -> web.Response:
    doc = {"error": {"message": message, "type": type_, "param": param, "code": code if code is not None else status}}
    return web.json_response(doc, status=status)


def parse_model(model: str, adapters: Iterable[str], bases: Iterable[str]) -> dict[str, float]:
    """A `model` value -> {adapter name: scale}; {} is the bare base.

    `sql` is that adapter at 1.0, a base name the base alone, and `sql@0.5+style` a mix: adapters joined by
    `+`, each with an optional `@SCALE`. An exact adapter or base name wins over the mix syntax. `bases`
    lists the base's names, the one to show first.
    """
    names, bases = list(adapters), list(bases)
    if model in bases:
        return {}
    if model in names:
        return {model: 1.0}
    out: dict[str, float] = {}
    for term in model.split("+"):
        name, at, scale = term.strip().rpartition("@")
        if not at:
            name, scale = term.strip(), "1"
        if name not in names:
            raise _unknown_model(model, names, bases, name if name != model else None)
        try:
            value = float(scale)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise RouteError(400, f"model {model!r}: {scale!r} is not a scale; write NAME@SCALE, e.g. {name}@0.5",
                             param="model", code="invalid_model")
        if name in out:
            raise RouteError(400, f"model {model!r} names adapter {name!r} twice", param="model", code="invalid_model")
        out[name] = value
    return out


def _unknown_model(model: str | None, names: list[str], bases: list[str], part: str | None = None) -> RouteError:
    listed = ", ".join([*bases[:1], *names])
    what = "no model was given" if model is None else f"the model {model!r} does not exist" if part is None \
        else f"the model {model!r} names {part!r}, which is not an adapter here"
    return RouteError(404, f"{what}; this server has: {listed} (a mix: NAME@SCALE+NAME, e.g. "
                           f"{names[0] if names else 'sql'}@0.5)", code="model_not_found", param="model")


def model_name(selection: dict[str, float], base: str) -> str:
    """The `model` value that selects exactly this {name: scale} (the inverse of parse_model)."""
    active = [(n, s) for n, s in selection.items() if s]
    if not active:
        return base
    return "+".join(n if s == 1 else f"{n}@{s:g}" for n, s in active)


@dataclass
class Backend:
    """One running llama-server behind the router: its process, its adapters and the name it gives the model."""
    server: ManagedServer
    adapters: list[Adapter]
    model_id: str
    headers: dict

    @property
    def url(self) -> str:
        return self.server.url

    def lora(self, selection: dict[str, float]) -> list[dict]:
        return [{"id": a.id, "scale": float(selection.get(a.name, 0.0))} for a in self.adapters]


class Router:
    """`gguf-lora serve`: llama-server on a private port, and an OpenAI-compatible front on `host:port`.

    run() serves in the calling thread until stop() or a signal (returns) or until llama-server dies (raises
    ServerError). start() / stop() (or `with`) run it in a background thread, for tests and embedding.
    """

    def __init__(self, base: str | Path, adapters: str | Path | Iterable[str | Path] = (), *,
                 host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
                 llama_server: str | Path | None = None, extra_args: Iterable[str] = (),
                 log: str | Path | None = None, ready_timeout: float = 300.0, scales: dict[str, float] | None = None,
                 unknown_model: str = "error", watch: float | None = 1.0, notify: Notify | None = None):
        self.base = Path(base)
        if not self.base.is_file():
            raise InputError(f"Base model {self.base} does not exist", "", "pass the base GGUF the adapters were "
                             "converted for")
        self.sources = [Path(a) for a in ([adapters] if isinstance(adapters, (str, Path)) else adapters)]
        self.files = adapter_files(self.sources) if self.sources else []
        self.extra_args = list(extra_args)
        for arg in self.extra_args:
            if arg.split("=", 1)[0] in ROUTER_OWN_FLAGS:
                raise InputError(f"llama-server argument {arg} cannot be passed through",
                                 "gguf-lora sets it itself to keep adapter switching exact" if arg.split("=", 1)[0]
                                 in OWN_FLAGS else "a restored slot would reuse KV computed under another adapter",
                                 "use the matching gguf-lora option instead, or drop it")
        if unknown_model not in UNKNOWN_MODEL:
            raise InputError(f"Unknown-model policy {unknown_model!r} is not one of {', '.join(UNKNOWN_MODEL)}", "",
                             "pass error (a 404 listing the models) or selection (the 'adapters use' selection)")
        stems = {p.stem for p in self.files}
        for name in scales or {}:
            if name not in stems:
                raise InputError(f"No adapter named {name!r} on the server",
                                 f"it has: {', '.join(sorted(stems)) or 'none'}",
                                 "use one of those names (gguf-lora adapters list)")
        if self.base.stem in stems:
            raise InputError(f"Adapter {self.base.stem!r} has the base model's name", "clients pick models by name",
                             "rename the adapter file")
        if port:
            _check_port_free(host, port)
        self.host, self.port, self.api_key = host, port, api_key
        self.llama_server, self.log, self.ready_timeout = llama_server, log, ready_timeout
        self.selection = dict(scales or {})  # the global selection ('adapters use'), by name
        self.unknown_model, self.watch = unknown_model, watch
        self.notify = notify or (lambda _msg: None)
        self.backend: Backend | None = None
        self.fatal: ServerError | None = None
        self.restarts = 0
        self.refused: dict[Path, tuple] = {}  # adapter files llama-server refused, with the stat they had
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # ---- public ------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else "[::1]" if self.host == "::" else \
            f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_name(self) -> str:
        return self.base.stem

    def run(self, on_ready: Callable[[Router], None] | None = None, handle_signals: bool = False) -> None:
        asyncio.run(self._main(on_ready, handle_signals))

    def start(self) -> Router:
        def target():
            try:
                self.run(lambda _r: self._ready.set())
            except BaseException as e:  # handed to start() or stop()
                self._error = e
            finally:
                self._ready.set()

        self._thread = threading.Thread(target=target, name="gguf-lora-router", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def stop(self, timeout: float = 60.0) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already finished
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> Router:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- life cycle ---------------------------------------------------------------------------------------
    async def _main(self, on_ready, handle_signals: bool) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._gate = asyncio.Event()  # set while requests may go to llama-server
        self._inflight = 0
        self._idle = asyncio.Condition()
        if handle_signals:
            import signal

            for sig in (signal.SIGINT, signal.SIGTERM):
                self._loop.add_signal_handler(sig, self._stop.set)
        app = web.Application(middlewares=[self._errors, self._auth], client_max_size=256 * 2**20)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/models", self._models)
        app.router.add_get("/v1/models/{model}", self._model)
        for path in ("/health", "/v1/health"):
            app.router.add_get(path, self._health)
        for path in GENERATING:
            app.router.add_post(path, self._generate)
        for path in REFUSED:
            app.router.add_post(path, self._refuse)
        app.router.add_post("/lora-adapters", self._set_global)
        app.router.add_route("*", "/{tail:.*}", self._passthrough)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise InputError(f"Cannot listen on {self.host}:{self.port}", e.strerror or str(e),
                             "pass another --port (or stop what uses it)") from None
        if self.port == 0:
            self.port = runner.addresses[0][1]
        self.session = aiohttp.ClientSession(
            # llama-server (cpp-httplib) closes a connection after 5 s idle: drop ours before it does
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE, enable_cleanup_closed=True),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10), trust_env=False)
        tasks = []
        try:
            self.backend = await asyncio.to_thread(self._start_backend, self.files, initial=True)
            self._gate.set()
            tasks.append(asyncio.create_task(self._monitor()))
            if self.watch and any(p.is_dir() for p in self.sources):
                tasks.append(asyncio.create_task(self._watch()))
            if on_ready:
                on_ready(self)
            await self._stop.wait()
        finally:
            self._gate.clear()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await runner.cleanup()
            await self.session.close()
            if self.backend is not None:
                await asyncio.to_thread(self.backend.server.close)
                self.backend = None
        if self.fatal is not None:
            raise self.fatal

    def _start_backend(self, files: list[Path], initial: bool = False) -> Backend:
        """Start llama-server with these adapters (blocking); a refused adapter is left out on a restart."""
        files = list(files)
        while True:
            names = {p.stem for p in files}
            server = ManagedServer(self.base, files, host="127.0.0.1", port=free_port(),
                                   llama_server=self.llama_server, api_key=secrets.token_urlsafe(24),
                                   extra_args=self.extra_args, log=self.log, ready_timeout=self.ready_timeout,
                                   scales={n: s for n, s in self.selection.items() if n in names},
                                   prompt_cache=True, append_log=not initial)
            try:
                client = server.start()
            except ServerError as e:
                refused = re.match(r"llama-server refused adapter (.*)$", e.what)
                if initial or not refused or Path(refused.group(1)) not in files:
                    raise
                bad = Path(refused.group(1))
                self.refused[bad] = _stat(bad)
                self.notify(f"left out adapter {bad.name}: {e}")
                files.remove(bad)
                continue
            try:
                adapters = client.adapters()
                models = client.http.json("GET", "/v1/models")
                model_id = str(models["data"][0]["id"])
                self.selection = {a.name: a.scale for a in adapters if a.scale}
            except (GgufLoraError, KeyError, IndexError, TypeError) as e:
                server.close()
                raise ServerError("llama-server started but did not describe itself", str(e),
                                  f"check its log {server.log}") from None
            return Backend(server, adapters, model_id, {"Authorization": f"Bearer {server.api_key}"})

    async def _monitor(self) -> None:
        """A llama-server that exits on its own is fatal: stop serving, and run() raises."""
        while True:
            await asyncio.sleep(0.2)
            b = self.backend
            if b is not None and b.server.proc.poll() is not None:
                code = b.server.proc.returncode
                tail = b.server.log_tail(8).strip().replace("\n", " | ")
                self.fatal = ServerError(f"llama-server stopped unexpectedly with exit code {code}",
                                         f"its log ends: {tail[-600:]}" if tail else "it wrote no log",
                                         f"see the full log {b.server.log}")
                self._gate.clear()
                self._stop.set()
                return

    async def _watch(self) -> None:
        """Restart llama-server when the adapter folders change (after the change has settled)."""
        current = _snapshot(self.sources)
        pending = None
        while True:
            await asyncio.sleep(self.watch)
            now = _snapshot(self.sources)
            if now == current:
                pending = None
                continue
            if now != pending:  # still changing (a copy in progress): look again next time
                pending = now
                continue
            current, pending = now, None
            files = self._adapters_now()
            if [str(p) for p in files] == [str(p) for p in self.backend.server.adapters]:
                continue
            await self._restart(files)

    def _adapters_now(self) -> list[Path]:
        """The adapter files of the sources as they are now; unreadable or refused files are left out."""
        from ..gguf_read import general_type  # numpy + gguf: loaded when the folder is watched, not at start-up

        out, seen = [], set()
        for src in self.sources:
            candidates = sorted(src.glob("*.gguf")) if src.is_dir() else [src] if src.is_file() else []
            for p in candidates:
                try:
                    if general_type(p) != "adapter":
                        continue
                except GgufLoraError as e:
                    self.notify(f"skipping {p}: {e}")
                    continue
                if p in self.refused and self.refused[p] == _stat(p):
                    continue
                if p.stem in seen or p.stem == self.base_name:
                    self.notify(f"skipping {p}: another model is already named {p.stem!r}")
                    continue
                seen.add(p.stem)
                out.append(p)
        return out

    async def _restart(self, files: list[Path]) -> None:
        """Hold new requests, let running ones finish, restart llama-server with `files`, release the hold."""
        old = self.backend
        gone = sorted({a.name for a in old.adapters} - {p.stem for p in files})
        added = sorted({p.stem for p in files} - {a.name for a in old.adapters})
        self.notify(f"adapters changed (added: {', '.join(added) or 'none'}; removed: {', '.join(gone) or 'none'}); "
                    "restarting llama-server, holding new requests")
        self._gate.clear()
        async with self._idle:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait_for(lambda: self._inflight == 0), DRAIN_TIMEOUT)
        self.backend = None
        await asyncio.to_thread(old.server.close)
        try:
            self.backend = await asyncio.to_thread(self._start_backend, files)
        except GgufLoraError as e:
            self.fatal = e if isinstance(e, ServerError) else ServerError(str(e))
            self._stop.set()
            return
        self.restarts += 1
        self._gate.set()
        self.notify(f"llama-server restarted: models {', '.join(self.model_ids())}")

    # ---- requests ------------------------------------------------------------------------------------------
    def model_ids(self) -> list[str]:
        return [self.base_name] + [a.name for a in (self.backend.adapters if self.backend else [])]

    @web.middleware
    async def _errors(self, request, handler):
        try:
            return await handler(request)
        except RouteError as e:
            return e.response()

    @web.middleware
    async def _auth(self, request, handler):
        if self.api_key and request.path not in PUBLIC:
            got = request.headers.get("Authorization") or request.headers.get("X-Api-Key") or ""
            got = got[7:] if got.startswith("Bearer ") else got
            if not secrets.compare_digest(got.encode(), self.api_key.encode()):
                raise RouteError(401, "Invalid API Key", "authentication_error", "invalid_api_key")
        return await handler(request)

    @contextlib.asynccontextmanager
    async def _backend(self):
        """The running llama-server; waits (bounded) while it restarts; counts the request as running."""
        if not self._gate.is_set():
            try:
                await asyncio.wait_for(self._gate.wait(), self.ready_timeout)
            except asyncio.TimeoutError:
                raise RouteError(503, f"llama-server is not ready after {self.ready_timeout:g} s", "unavailable_error")
        backend = self.backend
        if backend is None or self.fatal is not None:
            raise RouteError(503, "llama-server is not running", "unavailable_error")
        self._inflight += 1
        try:
            yield backend
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                async with self._idle:
                    self._idle.notify_all()

    async def _health(self, request):
        if self._gate.is_set() and self.backend is not None:
            return web.json_response({"status": "ok"})
        return error_response(503, "Loading model", "unavailable_error")

    async def _models(self, request):
        async with self._backend():
            created = int(time.time())
            data = [{"id": self.base_name, "object": "model", "created": created, "owned_by": "gguf-lora"}]
            data += [{"id": name, "object": "model", "created": created, "owned_by": "gguf-lora",
                      "parent": self.base_name} for name in self.model_ids()[1:]]
            return web.json_response({"object": "list", "data": data})

    async def _model(self, request):
        listed = await self._models(request)
        for entry in json.loads(listed.body)["data"]:
            if entry["id"] == request.match_info["model"]:
                return web.json_response(entry)
        raise _unknown_model(request.match_info["model"], self.model_ids()[1:], [self.base_name])

    async def _refuse(self, request):
        raise RouteError(501, f"{request.path} is not served: {REFUSED[request.path]}", "not_supported_error")

    async def _generate(self, request):
        body = await _json_body(request)
        async with self._backend() as backend:
            name, selection = self._select(body, backend)
            if backend.adapters:
                body["lora"] = backend.lora(selection)
            rewrite = None
            if name is not None and request.path in OPENAI:
                rewrite = (b'"model":' + json.dumps(backend.model_id, ensure_ascii=False).encode(),
                           b'"model":' + json.dumps(name, ensure_ascii=False).encode())
            return await self._forward(request, backend, json.dumps(body).encode(), rewrite)

    def _select(self, body: dict, backend: Backend) -> tuple[str | None, dict[str, float]]:
        """(the model name to report, {adapter: scale}) for a request: its `lora` list, else its `model`."""
        names = [a.name for a in backend.adapters]
        bases = [self.base_name, backend.model_id]
        lora = body.get("lora")
        if lora not in (None, []):  # llama-server's own field; [] means "not given" to llama-server too
            if not isinstance(lora, list) or not all(isinstance(x, dict) for x in lora):
                raise RouteError(400, "'lora' must be a list of {\"id\": N, \"scale\": X}", param="lora")
            by_id = {a.id: a.name for a in backend.adapters}
            out = {}
            for x in lora:
                i, s = x.get("id"), x.get("scale", 0.0)
                if not isinstance(i, int) or i not in by_id or not isinstance(s, (int, float)):
                    raise RouteError(400, f"'lora' entry {x} names no adapter here; ids: "
                                          f"{', '.join(f'{i}={n}' for i, n in by_id.items()) or 'none'}", param="lora")
                out[by_id[i]] = float(s)
            return None, out
        model = body.get("model")
        if isinstance(model, str) and model:
            try:
                return model, parse_model(model, names, bases)
            except RouteError as e:
                if self.unknown_model != "selection" or e.status != 404:
                    raise
        elif self.unknown_model != "selection":
            raise _unknown_model(None, names, [self.base_name])
        return model_name(self.selection, self.base_name), dict(self.selection)

    async def _set_global(self, request):
        """POST /lora-adapters ('adapters use'): llama-server's global scales; the router keeps a copy by name."""
        data = await request.read()
        async with self._backend() as backend:
            response = await self._forward(request, backend, data, None)
            if response.status == 200:
                async with self.session.get(backend.url + "/lora-adapters", headers=backend.headers) as r:
                    doc = await r.json()
                self.selection = {Path(a["path"]).stem: float(a["scale"]) for a in doc if a.get("scale")}
            return response

    async def _passthrough(self, request):
        data = await request.read()
        async with self._backend() as backend:
            return await self._forward(request, backend, data, None)

    async def _forward(self, request, backend: Backend, data: bytes, rewrite: tuple[bytes, bytes] | None):
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        headers.update(backend.headers)
        for attempt in (1, 2):
            try:
                up = await self.session.request(request.method, backend.url + request.path_qs, data=data,
                                                headers=headers, allow_redirects=False)
                break
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
                # a kept-alive connection llama-server closed as we reused it: once more on a new one
                if attempt == 1 and backend.server.proc.poll() is None:
                    continue
                raise RouteError(502, f"llama-server did not take the request: {type(e).__name__}: {e}",
                                 "server_error")
            except (aiohttp.ClientError, OSError) as e:
                raise RouteError(502, f"llama-server did not take the request: {type(e).__name__}: {e}",
                                 "server_error")
        try:
            return await self._relay(request, up, rewrite)
        finally:
            up.release()

    async def _relay(self, request, up: aiohttp.ClientResponse, rewrite):
        headers = {k: v for k, v in up.headers.items() if k.lower() not in HOP}
        if up.content_type == "text/event-stream":
            out = web.StreamResponse(status=up.status, headers=headers)
            await out.prepare(request)
            held = b""
            try:
                async for chunk in up.content.iter_any():
                    if rewrite:  # whole lines only, so that a name split across reads is still found
                        held += chunk
                        cut = held.rfind(b"\n") + 1
                        chunk, held = held[:cut].replace(*rewrite), held[cut:]
                        if not chunk:
                            continue
                    await out.write(chunk)
                if held:
                    await out.write(held.replace(*rewrite))
            except (ConnectionResetError, asyncio.CancelledError):
                up.close()  # the client left: closing the connection makes llama-server stop generating
                raise
            except (aiohttp.ClientError, OSError) as e:
                doc = {"error": {"message": f"llama-server broke off the stream: {e or type(e).__name__}",
                                 "type": "server_error", "param": None, "code": 502}}
                with contextlib.suppress(ConnectionResetError):
                    await out.write(b"data: " + json.dumps(doc).encode() + b"\n\n")
                return out
            with contextlib.suppress(ConnectionResetError):
                await out.write_eof()
            return out
        try:
            body = await up.read()
        except (aiohttp.ClientError, OSError) as e:
            raise RouteError(502, f"llama-server broke off its answer: {e or type(e).__name__}", "server_error")
        if up.status >= 400:
            return _openai_error(up.status, body)
        if rewrite:
            body = body.replace(*rewrite)
        return web.Response(status=up.status, body=body, headers=headers)


async def _json_body(request) -> dict:
    try:
        body = json.loads(await request.read())
    except ValueError as e:
        raise RouteError(400, f"the request body is not JSON: {e}")
    if not isinstance(body, dict):
        raise RouteError(400, "the request body must be a JSON object")
    return body


def _openai_error(status: int, body: bytes) -> web.Response:
    """llama-server's error, in OpenAI's shape, its reason kept."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return error_response(status, err["message"], str(err.get("type") or "server_error"), err.get("code"),
                              err.get("param"))
    text = body.decode(errors="replace").strip()[:500] or f"HTTP {status}"
    kind = "not_found_error" if status == 404 else "invalid_request_error" if status < 500 else "server_error"
    return error_response(status, f"llama-server: {text}", kind)


def _stat(p: Path) -> tuple:
    try:
        st = p.stat()
    except OSError:
        return ()
    return st.st_size, st.st_mtime_ns


def _snapshot(sources: list[Path]) -> dict:
    out = {}
    for src in sources:
        for p in (sorted(src.glob("*.gguf")) if src.is_dir() else [src]):
            out[str(p)] = _stat(p)
    return out
