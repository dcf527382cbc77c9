"""llama-server with hot-swapped LoRA adapters: a client that addresses adapters by name, and a managed process.

Two traps of the pinned llama-server shape this module (tests/test_llama_server.py pins both):
- `--lora-init-without-apply` leaves every adapter at scale 1.0 for requests without a `lora` field, so a
  managed server sets its scales explicitly as soon as it is ready.
- The prompt cache ignores adapters: a request without `lora` after a global switch, or any request served
  from the RAM prompt cache (`--cache-ram`), reuses KV computed under another adapter and returns wrong
  output without an error. The client therefore sends the full adapter list on every request and, unless
  the server is known to be configured against it, turns prompt caching off for its requests. A managed
  server runs with `--no-cache-prompt --cache-ram 0`, which makes requests from any client exact.
"""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InputError, ServerError, ServerUnreachable, brief
from ..llama_cpp import find_tool
from ..validate import usable_path
from .http import Http

# What a request may name: None = the server's current global selection; a name; names at scale 1;
# or a mapping name/id -> scale. An empty mapping or list selects the base alone.
Selection = None | str | int | Iterable[str | int] | Mapping[str | int, float]

# Flags a managed server sets itself; passing them again would undo what makes switching exact.
OWN_FLAGS = {"-m", "--model", "--lora", "--lora-scaled", "--lora-init-without-apply", "--host", "--port",
             "--api-key", "--api-key-file", "--cache-prompt", "--no-cache-prompt", "-cram", "--cache-ram"}


@dataclass(frozen=True)
class Adapter:
    id: int
    name: str  # the file stem: how users and the CLI address it
    path: str
    scale: float

    def to_dict(self) -> dict:
        return asdict(self)


class LlamaServer:
    """A client of a running llama-server: readiness, adapters by name, completion and chat."""

    def __init__(self, url: str = "http://127.0.0.1:8080", api_key: str | None = None, timeout: float = 120.0,
                 prompt_cache: bool = False):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = Http(url, "llama-server", headers, timeout,
                         auth_fix="pass the key the server was started with (--api-key)")
        # Only safe when the server runs with --no-cache-prompt --cache-ram 0 (ManagedServer does).
        self.prompt_cache = prompt_cache

    @property
    def url(self) -> str:
        return self.http.url

    def ready(self) -> bool:
        """True when the model is loaded; False while llama-server answers 503 (loading)."""
        r = self.http.request("GET", "/health", ok=(200, 503), timeout=10)
        return r.status_code == 200

    def wait_ready(self, timeout: float = 120.0, process: subprocess.Popen | None = None) -> None:
        """Poll /health until ready; connection refusals count as 'still starting' until the deadline."""
        deadline = time.monotonic() + timeout
        last = "it never answered"
        while True:
            if process is not None and process.poll() is not None:
                raise ServerError("llama-server exited while starting", f"exit code {process.returncode}")
            try:
                if self.ready():
                    return
                last = "it answered 503 (still loading the model)"
            except ServerUnreachable as e:  # not listening yet
                last = e.why
            if time.monotonic() >= deadline:
                raise ServerError(f"llama-server at {self.url} was not ready after {timeout:g} s", last,
                                  "check that it runs and its log; a large model may need a longer wait")
            time.sleep(0.1)

    def props(self) -> dict:
        return _object(self.http.json("GET", "/props"), "/props")

    def adapters(self) -> list[Adapter]:
        doc = self.http.json("GET", "/lora-adapters")
        if not isinstance(doc, list):
            raise ServerError("llama-server's /lora-adapters is not a list", f"got {brief(doc, 80)}",
                              "check the server version")
        try:
            return [Adapter(int(a["id"]), Path(a["path"]).stem, a["path"], float(a["scale"])) for a in doc]
        except (KeyError, TypeError, ValueError) as e:
            raise ServerError("llama-server's /lora-adapters has an unexpected shape", f"{e!r} in {brief(doc, 80)}",
                              "check the server version")

    def scales(self, selection: Selection, adapters: list[Adapter] | None = None) -> dict[int, float]:
        """The full id -> scale list a selection means (every adapter named; unnamed ones at 0)."""
        adapters = self.adapters() if adapters is None else adapters
        if selection is None:
            return {a.id: a.scale for a in adapters}
        if isinstance(selection, (str, int)):
            selection = {selection: 1.0}
        elif not isinstance(selection, Mapping):
            selection = {key: 1.0 for key in selection}
        out = {a.id: 0.0 for a in adapters}
        for key, scale in selection.items():
            out[_find(adapters, key).id] = float(scale)
        return out

    def use(self, selection: Selection) -> list[Adapter]:
        """Set the global selection (what requests without a `lora` field get) and read it back."""
        adapters = self.adapters()
        want = self.scales(selection, adapters)
        doc = self.http.json("POST", "/lora-adapters", json=[{"id": i, "scale": s} for i, s in want.items()])
        now = self.adapters()
        got = {a.id: a.scale for a in now}
        if not (isinstance(doc, dict) and doc.get("success")) or any(abs(got.get(i, -1) - s) > 1e-6
                                                                      for i, s in want.items()):
            raise ServerError("llama-server did not apply the adapter scales", f"asked {want}, it reports {got}",
                              "check the server's log")
        return now

    def _body(self, adapter: Selection, params: dict) -> dict:
        adapters = self.adapters()
        body = dict(params)
        if adapters:
            body["lora"] = [{"id": i, "scale": s} for i, s in self.scales(adapter, adapters).items()]
        elif adapter not in (None, {}, [], ()):
            raise InputError(f"Adapter {adapter!r} was asked for, but the server at {self.url} has none loaded",
                             "llama-server loads adapters only at start-up (--lora)",
                             "restart it with the adapters (gguf-lora serve --adapters DIR)")
        body.setdefault("cache_prompt", self.prompt_cache)
        return body

    def complete(self, prompt: str | list[int], *, adapter: Selection = None, n_predict: int = 64,
                 **params) -> dict:
        """POST /completion with an explicit, full adapter list. Returns llama-server's JSON (`content`, ...)."""
        return _object(self.http.json("POST", "/completion", json=self._body(
            adapter, {"prompt": prompt, "n_predict": n_predict, **params})), "/completion")

    def chat(self, messages: list[dict], *, adapter: Selection = None, **params) -> dict:
        """POST /v1/chat/completions (OpenAI shape) with an explicit, full adapter list."""
        return _object(self.http.json("POST", "/v1/chat/completions", json=self._body(
            adapter, {"messages": messages, **params})), "/v1/chat/completions")


def _object(doc, path: str) -> dict:
    """A JSON answer that must be an object (callers index it: ["content"], ["choices"])."""
    if not isinstance(doc, dict):
        raise ServerError(f"llama-server answered {path} with {brief(doc, 80)}", "expected a JSON object",
                          "check the server version")
    return doc


def _find(adapters: list[Adapter], key: str | int) -> Adapter:
    if isinstance(key, int) or (isinstance(key, str) and key.isdigit() and not any(a.name == key for a in adapters)):
        hit = [a for a in adapters if a.id == int(key)]
    else:
        hit = [a for a in adapters if key in (a.name, a.path)] or [a for a in adapters if Path(a.path).name == key]
    names = ", ".join(a.name for a in adapters) or "none"
    if not hit:
        raise InputError(f"No adapter named {key!r} on the server", f"it has: {names}",
                         "use one of those names (gguf-lora adapters list)")
    if len(hit) > 1:
        raise InputError(f"Adapter name {key!r} is ambiguous", "; ".join(f"id {a.id}: {a.path}" for a in hit),
                         "address it by its path or id")
    return hit[0]


def adapter_files(adapters: str | Path | Iterable[str | Path]) -> list[Path]:
    """Folders (every GGUF LoRA in each, by name) and GGUF LoRA files, in order; names must be unique."""
    from ..gguf_read import general_type, lora_reader  # here, not at the top: numpy and gguf stay out
    # of `adapters use`

    items = [adapters] if isinstance(adapters, (str, Path)) else list(adapters)
    files: list[Path] = []
    for item in (usable_path(i, "Adapter ") for i in items):
        if item.is_dir():
            found = [p for p in sorted(item.glob("*.gguf")) if general_type(p) == "adapter"]
            if not found:
                raise InputError(f"{item} holds no GGUF LoRA adapter", "no *.gguf file there has "
                                 "general.type=adapter", "convert adapters into it (gguf-lora convert ... -o DIR/NAME.gguf)")
            files += found
        elif not item.is_file():
            raise InputError(f"Adapter {item} does not exist", "", "check the path")
        elif general_type(item) != "adapter":
            raise InputError(f"{item} is not a GGUF LoRA adapter", "its general.type is not 'adapter'",
                             "pass adapters converted with gguf-lora convert")
        else:
            files.append(item)
    for f in files:
        lora_reader(f)  # llama-server aborts (GGML_ASSERT) on an adapter whose keys have other types
    stems = [p.stem for p in files]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise InputError(f"Two adapters are named {dupes[0]!r}", "adapters are addressed by file name",
                         "rename one of them")
    return files


def parse_selection(items: Iterable[str]) -> dict[str, float]:
    """CLI form NAME[=SCALE] ... -> {name: scale}."""
    out = {}
    for item in items:
        name, _, scale = item.rpartition("=") if "=" in item else (item, "", "1")
        try:
            out[name] = float(scale)
        except ValueError:
            raise InputError(f"{item!r} is not NAME or NAME=SCALE", f"{scale!r} is not a number",
                             "write e.g. sql or sql=0.5") from None
    return out


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ManagedServer:
    """llama-server started for a base and adapters, configured so that switching adapters is exact.

    Use as a context manager, or start() / stop(). `client` is a LlamaServer for it.
    """

    def __init__(self, base: str | Path, adapters: str | Path | Iterable[str | Path] = (), *,
                 host: str = "127.0.0.1", port: int | None = None, llama_server: str | Path | None = None,
                 api_key: str | None = None, extra_args: Iterable[str] = (), log: str | Path | None = None,
                 ready_timeout: float = 120.0, scales: Selection = (), prompt_cache: bool = False,
                 append_log: bool = False):
        self.base = usable_path(base, "Base model ")
        if not self.base.is_file():
            raise InputError(f"Base model {self.base} does not exist", "", "pass the base GGUF the adapters were "
                             "converted for")
        self.adapters = adapter_files(adapters) if adapters else []
        self.extra_args = list(extra_args)
        for arg in self.extra_args:
            if arg.split("=", 1)[0] in OWN_FLAGS:
                raise InputError(f"llama-server argument {arg} cannot be passed through",
                                 "gguf-lora sets it itself to keep adapter switching exact",
                                 "use the matching gguf-lora option instead, or drop it")
        self.host, self.port = host, port or free_port(host)
        if port:
            _check_port_free(host, port)
        self.binary = find_tool("llama-server", llama_server)
        self.api_key, self.ready_timeout, self.initial = api_key, ready_timeout, scales
        self._tmp = None
        if log is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="gguf-lora-serve-")
            log = Path(self._tmp.name) / "llama-server.log"
        self.log = Path(log)
        # prompt_cache=True keeps llama-server's per-slot prompt cache: exact only for clients that send the
        # full adapter list with every request (gguf_lora.runtime.router does). The RAM cache stays off.
        self.prompt_cache, self.append_log, self._log_start = prompt_cache, append_log, 0
        self.proc: subprocess.Popen | None = None
        self.failed = False  # a failed start keeps its temporary log for the user to read
        self.client = LlamaServer(f"http://{_url_host(host)}:{self.port}", api_key, prompt_cache=True)

    @property
    def url(self) -> str:
        return self.client.url

    def command(self) -> list[str]:
        cmd = [str(self.binary), "-m", str(self.base), "--host", self.host, "--port", str(self.port),
               *([] if self.prompt_cache else ["--no-cache-prompt"]), "--cache-ram", "0"]
        if self.adapters:
            cmd.append("--lora-init-without-apply")
        for a in self.adapters:
            cmd += ["--lora", str(a)]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        return cmd + self.extra_args

    def start(self) -> LlamaServer:
        with open(self.log, "ab" if self.append_log else "wb") as log:
            self._log_start = log.tell()  # a restarted server's messages are read from here on
            # Own session: Ctrl-C reaches us, and we stop the server in order.
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self.client.wait_ready(self.ready_timeout, self.proc)
            if self.adapters:
                # --lora-init-without-apply leaves scale 1.0 in effect: state the selection explicitly.
                self.client.use(self.initial)
        except ServerError as e:
            self.stop()
            self.failed = True
            raise self.diagnose(e) from None
        except BaseException:
            self.stop()
            raise
        return self.client

    def diagnose(self, error: ServerError) -> ServerError:
        """Turn a failed start into what the log says: which adapter failed and why, or the last error lines."""
        text = self.log_tail(200)
        failed = re.search(r"failed to load lora adapter '([^']*)'", text)
        if failed:
            reason = (re.findall(r"failed to apply lora adapter: (.*)", text)
                      or re.findall(r"llama_adapter_lora_init[^:]*: (.*)", text))
            return ServerError(f"llama-server refused adapter {failed.group(1)}",
                               reason[-1].strip() if reason else "see its log: " + str(self.log),
                               "check that the adapter was converted for this base "
                               "(gguf-lora inspect ADAPTER --base BASE)")
        errors = [ln.strip() for ln in text.splitlines() if re.search(r"\bE\b|error|failed", ln)][-3:]
        why = " | ".join(errors) if errors else str(error)
        return ServerError(error.what, why, f"the full log is {self.log}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(self._log_start)
                return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait(self) -> int:
        """Block until the server exits (foreground `serve`); its exit code."""
        return self.proc.wait()

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None and not self.failed:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise InputError(f"Cannot listen on {host}:{port}", e.strerror or str(e),
                             "pass another --port (or stop what uses it)") from None


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host

