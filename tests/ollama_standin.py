"""A local stand-in for Ollama that enforces the documented contract (/work/shared/reference/ollama-api.md).

No Ollama binary is reachable here, so the client is tested against this: a loopback HTTP server with a store
laid out like Ollama's (blobs/sha256-<hex>, manifests/<host>/<namespace>/<model>/<tag>), which rejects what
real Ollama rejects and runs models for real as Ollama >= 0.30 does: the pinned llama-server with the model
blob and one `--lora <blob>` per adapter layer at scale 1.0, one runner per model name.

Honest limits: /api/generate ignores TEMPLATE even without raw (the prompt goes in as given), /api/chat
joins the messages' contents with spaces (no chat template), and safetensors adapters are refused rather than converted.

Fault switches (attributes, settable while running):
  version            what /api/version reports
  new_refuse         True (default): from 0.34.1 every create with adapters fails, as newer Ollama is reported
                     to; False: newer versions take GGUF adapters through the API (what its server code reads)
  ignore_adapters    start runners without --lora (an Ollama that silently drops the adapter)
  refuse_adapters    a message: every create with adapters fails mid-stream with it (whatever the version)
  cut_create         end create streams before "success"
  garbage            paths answered with 200 and a body that is not JSON
"""
from __future__ import annotations

import hashlib
import json
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from llamacpp import Server

MODEL = "application/vnd.ollama.image.model"
ADAPTER = "application/vnd.ollama.image.adapter"
TEMPLATE = "application/vnd.ollama.image.template"
SYSTEM = "application/vnd.ollama.image.system"
PARAMS = "application/vnd.ollama.image.params"
DIGEST = re.compile(r"sha256[:-]([0-9a-f]{64})")
NAME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")
# option names Ollama accepts as PARAMETER / options (api.Options); anything else is an error
KNOWN_OPTIONS = {"stop", "temperature", "top_k", "top_p", "min_p", "typical_p", "seed", "num_ctx", "num_predict",
                 "num_keep", "repeat_penalty", "repeat_last_n", "presence_penalty", "frequency_penalty",
                 "num_batch", "num_gpu", "num_thread", "use_mmap"}


class Refusal(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def split_name(name: str) -> tuple[str, str, str, str]:
    """[host/][namespace/]model[:tag] with Ollama's defaults; Refusal(400) when not a valid name."""
    parts = (name or "").split("/")
    if not name or len(parts) > 3:
        raise Refusal(400, "invalid model name")
    model, _, tag = parts[-1].partition(":")
    ns = parts[-2] if len(parts) >= 2 else "library"
    host = parts[0] if len(parts) == 3 else "registry.ollama.ai"
    tag = tag or "latest"
    if not all(NAME_PART.fullmatch(p) for p in (ns, model, tag)) or not re.fullmatch(r"[A-Za-z0-9.:-]+", host):
        raise Refusal(400, "invalid model name")
    return host, ns, model, tag


def display(parts: tuple[str, str, str, str]) -> str:
    host, ns, model, tag = parts
    prefix = "" if (host, ns) == ("registry.ollama.ai", "library") else \
        f"{ns}/" if host == "registry.ollama.ai" else f"{host}/{ns}/"
    return f"{prefix}{model}:{tag}"


def go_quote(v: Any) -> str:
    """Like Go's %#v for the JSON values Ollama keeps: strings quoted, numbers bare."""
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    return f"{v:g}" if isinstance(v, float) else str(v)


class StandIn:
    def __init__(self, root: Path, version: str = "0.12.0"):
        self.root = Path(root)
        self.store = self.root / "models"
        (self.store / "blobs").mkdir(parents=True, exist_ok=True)
        (self.store / "manifests").mkdir(parents=True, exist_ok=True)
        self.version = version
        self.ignore_adapters = False
        self.refuse_adapters: str | None = None
        self.new_refuse = True
        self.cut_create = False
        self.garbage: set[str] = set()
        self.uploads: list[str] = []  # digests whose bytes were received and stored
        self.runners: dict[str, tuple[tuple, Server]] = {}
        self.runner_starts = 0
        self.lock = threading.RLock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                standin.route(self, "GET")

            def do_HEAD(self):
                standin.route(self, "HEAD")

            def do_POST(self):
                standin.route(self, "POST")

            def do_DELETE(self):
                standin.route(self, "DELETE")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    # ---- lifecycle ----
    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        with self.lock:
            for _, server in self.runners.values():
                server.stop()
            self.runners.clear()

    def __enter__(self) -> StandIn:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- store ----
    def blob(self, digest: str) -> Path:
        m = DIGEST.fullmatch(digest or "")
        if not m:
            raise Refusal(400, f"invalid digest format {digest!r}")
        return self.store / "blobs" / f"sha256-{m[1]}"

    def manifest_path(self, name: str) -> Path:
        return self.store.joinpath("manifests", *split_name(name))

    def manifest(self, name: str) -> dict:
        try:
            path = self.manifest_path(name)
        except Refusal:
            raise Refusal(404, f"model '{name}' not found")
        if not path.is_file():
            raise Refusal(404, f"model '{name}' not found")
        return json.loads(path.read_text())

    def write_blob(self, data: bytes) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = self.blob(digest)
        if not path.exists():
            path.write_bytes(data)
        return {"digest": digest, "size": len(data)}

    def models(self) -> list[str]:
        base = self.store / "manifests"
        return [display(f.relative_to(base).parts) for f in sorted(base.glob("*/*/*/*")) if f.is_file()]

    def layers(self, name: str, media: str) -> list[dict]:
        return [la for la in self.manifest(name)["layers"] if la["mediaType"] == media]

    def config(self, name: str, media: str) -> Any:
        found = self.layers(name, media)
        return json.loads(self.blob(found[0]["digest"]).read_bytes()) if found and media == PARAMS else \
            self.blob(found[0]["digest"]).read_text() if found else None

    def prune(self) -> None:
        used = {la["digest"] for f in (self.store / "manifests").glob("*/*/*/*") if f.is_file()
                for la in json.loads(f.read_text())["layers"]}
        for b in (self.store / "blobs").glob("sha256-*"):
            if b.name.replace("-", ":", 1) not in used:
                b.unlink()

    # ---- HTTP ----
    def route(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = h.path.split("?")[0]
        try:
            if path in self.garbage:
                return self.send(h, 200, b"<html>surprise</html>", "text/html")
            body = self.read_body(h) if method in ("POST", "DELETE") and not path.startswith("/api/blobs/") else None
            if method == "GET" and path == "/api/version":
                return self.send_json(h, 200, {"version": self.version})
            if method == "HEAD" and path.startswith("/api/blobs/"):
                return self.send(h, 200 if self.blob(path.rsplit("/", 1)[1]).exists() else 404, b"")
            if method == "POST" and path.startswith("/api/blobs/"):
                return self.upload(h, path.rsplit("/", 1)[1])
            if method == "POST" and path == "/api/create":
                return self.stream(h, self.create(self.json_body(body)))
            if method == "GET" and path == "/api/tags":
                return self.send_json(h, 200, {"models": [self.tag_entry(n) for n in self.models()]})
            if method == "POST" and path == "/api/show":
                return self.send_json(h, 200, self.show(self.json_body(body).get("model", "")))
            if method == "DELETE" and path == "/api/delete":
                return self.delete(h, self.json_body(body).get("model", ""))
            if method == "POST" and path == "/api/copy":
                req = self.json_body(body)
                src = self.manifest(req.get("source", ""))
                dst = self.manifest_path(req.get("destination", ""))
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_text(json.dumps(src))
                return self.send(h, 200, b"")
            if method == "POST" and path in ("/api/generate", "/api/chat"):
                return self.generate(h, path, self.json_body(body))
            if method == "GET" and path == "/api/ps":
                return self.send_json(h, 200, {"models": [{"name": n, "model": n} for n in self.runners]})
            raise Refusal(404, "404 page not found")
        except Refusal as e:
            self.send_json(h, e.status, {"error": e.message})

    def read_body(self, h) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    h.rfile.readline()
                    return bytes(out)
                out += h.rfile.read(size)
                h.rfile.readline()
        return h.rfile.read(int(h.headers.get("Content-Length") or 0))

    @staticmethod
    def json_body(body: bytes | None) -> dict:
        try:
            doc = json.loads(body or b"{}")
        except ValueError as e:
            raise Refusal(400, f"invalid JSON: {e}")
        if not isinstance(doc, dict):
            raise Refusal(400, "invalid request body")
        return doc

    def send(self, h, status: int, data: bytes, ctype: str = "application/json") -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def send_json(self, h, status: int, doc: Any) -> None:
        self.send(h, status, json.dumps(doc).encode())

    def stream(self, h, events: Iterator[dict]) -> None:
        """Ollama's streamResponse: an error before anything was written takes the HTTP status; after that it
        is one more NDJSON line under 200."""
        started = False
        for ev in events:
            if "error" in ev and not started:
                return self.send_json(h, ev.pop("status", 500), {"error": ev["error"]})
            if not started:
                h.send_response(200)
                h.send_header("Content-Type", "application/x-ndjson")
                h.end_headers()  # HTTP/1.0: the body ends when the connection closes
                started = True
            ev.pop("status", None) if "error" in ev else None
            h.wfile.write(json.dumps(ev).encode() + b"\n")
            h.wfile.flush()
            if "error" in ev:
                return

    def upload(self, h, digest: str) -> None:
        path = self.blob(digest)
        if path.exists():  # Ollama answers 200 without reading the body
            self.read_body(h)
            return self.send(h, 200, b"")
        data = self.read_body(h)
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        if got != digest.replace("-", ":", 1):
            raise Refusal(400, f"digest mismatch, expected {json.dumps(digest)}, got {json.dumps(got)}")
        path.write_bytes(data)
        self.uploads.append(got)
        self.send(h, 201, b"")

    # ---- create ----
    def create(self, req: dict) -> Iterator[dict]:
        name = req.get("model") or req.get("name") or ""
        try:
            split_name(name)
        except Refusal as e:
            yield {"error": e.message, "status": 400}
            return
        for key in ("files", "adapters"):
            for fname in (req.get(key) or {}):
                p = Path(fname)
                if p.is_absolute() or ".." in p.parts or fname.startswith("\\") or not fname:
                    yield {"error": "file path must be relative", "status": 400}
                    return
        if not req.get("from") and not req.get("files"):
            yield {"error": "neither 'from' or 'files' was specified", "status": 400}
            return
        layers: list[dict] = []
        if req.get("from"):
            try:
                layers = list(self.manifest(req["from"])["layers"])
            except Refusal:
                yield {"status": "pulling manifest"}
                yield {"error": "pull model manifest: file does not exist"}
                return
        for fname, digest in (req.get("files") or {}).items():
            yield {"status": "parsing GGUF"}
            layer = yield from self.gguf_layer(digest, MODEL)
            if layer is None:
                return
            layers = [la for la in layers if la["mediaType"] != MODEL] + [layer]
        if req.get("adapters"):
            refusal = self.refuse_adapters or (
                "adapters are not supported by this version of Ollama; merge the adapter into the model"
                if self.new_refuse and tuple(int(x) for x in re.findall(r"\d+", self.version)[:3]) >= (0, 34, 1)
                else None)
            if refusal:
                yield {"status": "parsing GGUF"}
                yield {"error": refusal}
                return
            added = None
            for fname, digest in req["adapters"].items():
                yield {"status": "parsing GGUF"}
                added = yield from self.gguf_layer(digest, ADAPTER)
                if added is None:
                    return
            layers.append(added)  # one adapter per create (the last wins); those of `from` stay: they stack
        params = dict(req.get("parameters") or {})
        for key in params:
            if key not in KNOWN_OPTIONS:
                yield {"error": f"invalid parameter: unknown option '{key}'"}
                return
        for media, value in ((TEMPLATE, req.get("template")), (SYSTEM, req.get("system"))):
            if value:
                layers = [la for la in layers if la["mediaType"] != media] + [
                    {"mediaType": media, **self.write_blob(value.encode())}]
        if params:
            old = {}
            for la in layers:
                if la["mediaType"] == PARAMS:
                    old = json.loads(self.blob(la["digest"]).read_bytes())
            merged = {**old, **{k: (v if k != "stop" or isinstance(v, list) else [v]) for k, v in params.items()}}
            layers = [la for la in layers if la["mediaType"] != PARAMS] + [
                {"mediaType": PARAMS, **self.write_blob(json.dumps(merged).encode())}]
        for la in layers:
            yield {"status": f"using existing layer {la['digest']}"}
        if self.cut_create:
            return
        yield {"status": "writing manifest"}
        path = self.manifest_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        config = self.write_blob(json.dumps({"model_format": "gguf"}).encode())
        path.write_text(json.dumps({"schemaVersion": 2, "mediaType":
                                    "application/vnd.docker.distribution.manifest.v2+json",
                                    "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                                               **config}, "layers": layers}))
        self.stop_runner(display(split_name(name)))
        yield {"status": "success"}

    def gguf_layer(self, digest: str, media: str):
        try:
            path = self.blob(digest)
        except Refusal as e:
            yield {"error": e.message}
            return None
        if not path.is_file():
            yield {"error": f"open {path}: no such file or directory"}
            return None
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                yield {"error": "unsupported adapter format (only GGUF adapters are handled by this stand-in)"
                       if media == ADAPTER else "invalid file magic"}
                return None
        if media == ADAPTER:
            from gguf_lora.gguf_read import GGUFFile

            t = GGUFFile(path).fields.get("general.type")
            if not t or t.value != "adapter":
                media = MODEL  # Ollama stores a GGUF without general.type=adapter as a second model layer
        return {"mediaType": media, "digest": "sha256:" + path.name[7:], "size": path.stat().st_size}

    # ---- show / tags / delete ----
    def tag_entry(self, name: str) -> dict:
        m = self.manifest(name)
        size = sum(la["size"] for la in m["layers"])
        digest = hashlib.sha256(json.dumps(m).encode()).hexdigest()
        return {"name": name, "model": name, "size": size, "digest": digest,
                "details": {"format": "gguf", "family": self.arch(name), "parameter_size": "", "quantization_level": ""}}

    def arch(self, name: str) -> str:
        from gguf_lora.gguf_read import GGUFFile

        model = self.layers(name, MODEL)
        f = GGUFFile(self.blob(model[0]["digest"])).fields.get("general.architecture") if model else None
        return f.value if f else ""

    def show(self, name: str) -> dict:
        self.manifest(name)
        template, system, params = self.config(name, TEMPLATE), self.config(name, SYSTEM), self.config(name, PARAMS)
        lines = [f"# Modelfile generated by \"ollama show\"\nFROM {self.blob(la['digest'])}"
                 for la in self.layers(name, MODEL)[:1]]
        if template:
            lines.append(f'TEMPLATE """{template}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
        plines = []
        for k, v in (params or {}).items():
            for one in v if isinstance(v, list) else [v]:
                lines.append(f"PARAMETER {k} {go_quote(one)}")
                plines.append(f"{k:<30} {go_quote(one)}")
        lines += [f"ADAPTER {self.blob(la['digest'])}" for la in self.layers(name, ADAPTER)]
        arch = self.arch(name)
        doc = {"modelfile": "\n".join(lines) + "\n", "parameters": "\n".join(plines), "template": template or "",
               "details": {"format": "gguf", "family": arch}, "model_info": {"general.architecture": arch}}
        if system:
            doc["system"] = system
        return doc

    def delete(self, h, name: str) -> None:
        self.manifest(name)
        self.manifest_path(name).unlink()
        self.stop_runner(display(split_name(name)))
        self.prune()
        self.send(h, 200, b"")

    # ---- runners ----
    def stop_runner(self, key: str) -> None:
        with self.lock:
            old = self.runners.pop(key, None)
        if old:
            old[1].stop()

    def runner(self, name: str) -> Server:
        key = display(split_name(name))
        model = self.layers(name, MODEL)
        if not model:
            raise Refusal(500, f"model '{name}' has no model layer")
        loras = [] if self.ignore_adapters else [self.blob(la["digest"]) for la in self.layers(name, ADAPTER)]
        sig = (model[0]["digest"], tuple(map(str, loras)))
        with self.lock:
            have = self.runners.get(key)
            if have and have[0] == sig and have[1].proc.poll() is None:
                return have[1]
            if have:
                have[1].stop()
            if len(self.runners) >= 4:  # like OLLAMA_MAX_LOADED_MODELS: unload the oldest
                oldest = next(iter(self.runners))
                self.runners.pop(oldest)[1].stop()
            log = self.root / f"runner-{key.replace('/', '_').replace(':', '_')}-{self.runner_starts}.log"
            try:
                server = Server(self.blob(model[0]["digest"]), loras, log)
            except RuntimeError as e:
                raise Refusal(500, f"llama runner process has terminated: {str(e)[-300:]}")
            self.runner_starts += 1
            self.runners[key] = (sig, server)
            return server

    def generate(self, h, path: str, req: dict) -> None:
        import requests

        name = req.get("model", "")
        try:
            self.manifest(name)
        except Refusal:
            raise Refusal(404, f"model '{name}' not found, try pulling it first" if path.endswith("generate")
                          else f"model \"{name}\" not found, try pulling it first")
        options = {**(self.config(name, PARAMS) or {}), **(req.get("options") or {})}
        for key in options:
            if key not in KNOWN_OPTIONS:
                raise Refusal(400, f"invalid option provided: {key}")
        if path.endswith("generate"):
            prompt = req.get("prompt", "")
        else:
            msgs = req.get("messages")
            if not isinstance(msgs, list):
                raise Refusal(400, "messages must be a list")
            prompt = " ".join(str(m.get("content", "")) for m in msgs)  # the tiny vocabulary has no "\n" or ":"
        server = self.runner(name)
        temperature = float(options.get("temperature", 0.8))
        body = {"prompt": prompt, "n_predict": min(int(options.get("num_predict", 64)), 128) if
                int(options.get("num_predict", 64)) >= 0 else 128, "temperature": temperature,
                "seed": int(options.get("seed", -1)), "stop": options.get("stop", []), "cache_prompt": False}
        if temperature == 0:
            body.update(samplers=["top_k"], top_k=1)
        elif "top_k" in options:
            body["top_k"] = int(options["top_k"])
        try:
            r = requests.post(server.url + "/completion", json=body, timeout=60)
            if r.status_code != 200:
                raise Refusal(500, f"llama runner failed: {r.status_code} {r.text[:300]}")
            text = r.json()["content"]
        except requests.RequestException as e:
            raise Refusal(500, f"llama runner failed: {e}")
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        piece = (lambda t: {"response": t}) if path.endswith("generate") else \
            (lambda t: {"message": {"role": "assistant", "content": t}})
        final = {"model": name, "created_at": created, **piece(""), "done": True, "done_reason": "stop"}
        if req.get("stream", True) is False:
            return self.send_json(h, 200, {**final, **piece(text)})
        half = len(text) // 2  # two content lines and the done line, as a stream would deliver them
        self.stream(h, iter([{"model": name, "created_at": created, **piece(text[:half]), "done": False},
                             {"model": name, "created_at": created, **piece(text[half:]), "done": False}, final]))


def import_gguf(standin: StandIn, gguf: Path, name: str, **extra) -> str:
    """Put a base GGUF into the stand-in's store through its API (as `ollama create -f` would)."""
    import requests

    data = Path(gguf).read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    requests.post(f"{standin.url}/api/blobs/{digest}", data=data, timeout=30).raise_for_status()
    r = requests.post(f"{standin.url}/api/create", json={"model": name, "files": {"model.gguf": digest}, **extra},
                      timeout=30)
    lines = [json.loads(x) for x in r.text.splitlines() if x.strip()]
    assert lines and lines[-1] == {"status": "success"}, lines
    return digest


def tmp_standin(version: str = "0.12.0") -> StandIn:
    return StandIn(Path(tempfile.mkdtemp(prefix="ollama-standin-")), version)
