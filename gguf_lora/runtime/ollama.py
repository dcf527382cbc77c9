"""Ollama: a client for its REST API, the model store on disk, and `deploy`, which turns an adapter into an
Ollama model and proves that Ollama applies it.

Ollama's adapter support depends on its version (see deploy), and a model that silently ignores its adapter
answers just like the base. So deploy ends with a check: greedy completions of the same prompts on the base
and on the new model must differ somewhere, or it is an error.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import tempfile
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import GgufLoraError, InputError, ServerError, UnsupportedError, brief
from ..gguf_read import general_type
from ..peft import sha256_file
from .http import Http

DEFAULT_PORT = 11434
MODEL_MEDIA = "application/vnd.ollama.image.model"
ADAPTER_MEDIA = "application/vnd.ollama.image.adapter"
MIN_VERSION = (0, 5, 5)  # the JSON create API (files / adapters / from)
# Reported: from 0.34.1 `ollama create` rejects ADAPTER. What is known is narrower (ollama#14969 removed the
# conversion of safetensors adapters; the CLI's Modelfile parsing refuses ADAPTER): the REST API with a GGUF
# LoRA, which deploy speaks, is tried on every version, and a refusal falls back to merging.
REPORTED_REFUSAL = (0, 34, 1)
DEFAULT_PROMPTS = ("The capital of France is", "Once upon a time", "def fibonacci(n):")
CHECK_OPTIONS = {"temperature": 0, "seed": 1, "top_k": 1, "num_predict": 8}

Progress = Callable[[str], None]


def ollama_url(host: str | None = None) -> str:
    """The server URL from an OLLAMA_HOST-style value, read as Ollama reads it: "host", "host:port", ":port",
    "http(s)://host[:port][/path]"; defaults 127.0.0.1 and 11434 (80 / 443 for an explicit scheme)."""
    s = (host if host is not None else os.environ.get("OLLAMA_HOST", "")).strip().strip('"').strip("'")
    scheme, sep, rest = s.partition("://")
    port = str(DEFAULT_PORT)
    if not sep:
        scheme, rest = "http", s
    elif scheme in ("http", "https"):
        port = "80" if scheme == "http" else "443"
    else:
        raise InputError(f"Ollama address {s!r} has scheme {scheme!r}", "Ollama speaks http or https",
                         "set OLLAMA_HOST like 127.0.0.1:11434 or http://host:11434")
    hostport, _, path = rest.partition("/")
    if hostport.startswith("["):  # [ipv6]:port
        host_part, _, after = hostport[1:].partition("]")
        port = after[1:] if after.startswith(":") and after[1:] else port
    elif hostport.count(":") == 1:
        host_part, given = hostport.split(":")
        port = given or port
    else:  # a bare name or address (a bare IPv6 has several colons)
        host_part = hostport
    host_part = host_part or "127.0.0.1"
    if not port.isdigit() or int(port) > 65535:
        raise InputError(f"Ollama address {s!r} has port {port!r}", "a port is a number up to 65535",
                         "set OLLAMA_HOST like 127.0.0.1:11434")
    if host_part == "0.0.0.0":  # a listen-everywhere address: reach it on loopback
        host_part = "127.0.0.1"
    if ":" in host_part:
        host_part = f"[{host_part}]"
    return f"{scheme}://{host_part}:{port}" + (f"/{path}".rstrip("/") if path else "")


def parse_version(text: str) -> tuple[int, int, int]:
    m = re.match(r"v?(\d+)\.(\d+)\.(\d+)", str(text).strip())
    if not m:
        raise ServerError(f"Ollama reported version {text!r}", "it is not x.y.z", "check that the URL is Ollama")
    return int(m[1]), int(m[2]), int(m[3])


def file_digest(path: Path) -> str:
    """sha256:<hex> of a file, Ollama's blob name (read in chunks: a model is gigabytes)."""
    return "sha256:" + sha256_file(path)


class Ollama:
    """A client for one Ollama server. Every call has a deadline; every failure is a ServerError."""

    def __init__(self, url: str | None = None, timeout: float = 300.0):
        self.url = ollama_url(url)
        self.http = Http(self.url, "Ollama", timeout=timeout, auth_fix="check the proxy in front of Ollama")

    def version(self) -> str:
        doc = self.http.json("GET", "/api/version", timeout=10)
        if not isinstance(doc, dict) or not isinstance(doc.get("version"), str):
            raise ServerError(f"{self.url} answered /api/version with {brief(doc, 80)}", "expected {\"version\": ...}",
                              "check that the URL is Ollama")
        return doc["version"]

    def has_blob(self, digest: str) -> bool:
        return self.http.request("HEAD", f"/api/blobs/{digest}", ok=(200, 404)).status_code == 200

    def push_blob(self, path: str | Path, digest: str | None = None) -> str:
        """Upload a file as a blob unless Ollama has it already; return its digest (sha256:<hex>)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path} is not a file", "only files can become Ollama blobs", "check the path")
        digest = digest or file_digest(path)
        if self.has_blob(digest):
            return digest
        with open(path, "rb") as f:  # streamed: requests sends the file object in chunks with its Content-Length
            try:
                self.http.request("POST", f"/api/blobs/{digest}", ok=(200, 201), data=f)
            except ServerError as e:
                if "digest mismatch" in e.why:
                    raise ServerError(f"Ollama refused {path} as blob {digest[:19]}...", e.why,
                                      "the file changed while uploading, or the digest was wrong; run it again")
                raise
        return digest

    def create(self, model: str, *, from_: str | None = None, files: dict[str, str] | None = None,
               adapters: dict[str, str] | None = None, template: str | None = None, system: str | None = None,
               parameters: dict[str, Any] | None = None, progress: Progress | None = None) -> None:
        """POST /api/create; every streamed line is checked and the stream must end with success."""
        if not from_ and not files:
            raise InputError(f"Creating {model} needs a base", "Ollama wants `from` (a model) or `files` (blobs)",
                             "pass from_ or files")
        body: dict[str, Any] = {"model": model, "stream": True}
        for key, value in (("from", from_), ("files", files), ("adapters", adapters), ("template", template),
                           ("system", system), ("parameters", parameters)):
            if value:
                body[key] = value
        last = None
        for doc in self.http.ndjson("POST", "/api/create", json=body):
            last = doc.get("status")
            if progress and last:
                progress(last)
        if last != "success":
            raise ServerError(f"Ollama's stream for creating {model} ended without success", f"last status: {last!r}",
                              "the model may be incomplete; check Ollama's log and run it again")

    def list(self) -> list[dict]:
        doc = self.http.json("GET", "/api/tags", timeout=30)
        if not isinstance(doc, dict) or not isinstance(doc.get("models", []), list):
            raise ServerError(f"{self.url} answered /api/tags with {brief(doc, 80)}", "expected {\"models\": [...]}",
                              "check that the URL is Ollama")
        return doc.get("models") or []

    def _known(self, model: str, call: Callable[[], Any]) -> Any:
        """Run a call about one model; a 404 says which model is missing and how to get it."""
        try:
            return call()
        except ServerError as e:
            if e.status != 404:
                raise
            raise ServerError(f"Ollama at {self.url} has no model {model}", e.why,
                              f"pull it with 'ollama pull {model}' or check the name with 'ollama list'") from None

    def show(self, model: str) -> dict:
        doc = self._known(model, lambda: self.http.json("POST", "/api/show", json={"model": model}, timeout=60))
        if not isinstance(doc, dict):
            raise ServerError(f"{self.url} answered /api/show with {brief(doc, 80)}", "expected an object",
                              "check that the URL is Ollama")
        for key in ("template", "system", "parameters"):  # the fields deploy carries over
            if doc.get(key) is not None and not isinstance(doc[key], str):
                raise ServerError(f"Ollama's /api/show answer for {model} has {key} = {brief(doc[key], 60)}",
                                  "expected text", "check that the URL is Ollama")
        return doc

    def delete(self, model: str) -> None:
        self._known(model, lambda: self.http.request("DELETE", "/api/delete", json={"model": model}, timeout=60)).close()

    def generate(self, model: str, prompt: str, *, raw: bool = False, options: dict | None = None,
                 stream: bool = False) -> str:
        body = {"model": model, "prompt": prompt, "raw": raw, "stream": stream, "options": options or {}}
        return self._text("/api/generate", body, lambda d: d.get("response", ""))

    def chat(self, model: str, messages: list[dict], options: dict | None = None, stream: bool = False) -> str:
        body = {"model": model, "messages": messages, "stream": stream, "options": options or {}}
        return self._text("/api/chat", body, lambda d: d["message"].get("content", "")
                          if isinstance(d.get("message"), dict) else d.get("message"))

    def _text(self, path: str, body: dict, piece: Callable[[dict], str]) -> str:
        """The final text of a generation, whether Ollama streams NDJSON or answers one JSON document."""
        parts, done = [], False
        lines = self.http.ndjson("POST", path, json=body)  # a generator: the request goes out on the first next()
        first = self._known(body["model"], lambda: next(lines, None))
        for doc in itertools.chain([first] if first is not None else [], lines):
            text = piece(doc)
            if text is not None and not isinstance(text, str):
                raise ServerError(f"Ollama's answer to {path} for {body['model']} holds {brief(text, 60)} as text",
                                  "expected a string", "check that the URL is Ollama")
            parts.append(text or "")
            done = done or bool(doc.get("done"))
        if not done:
            raise ServerError(f"Ollama's answer to {path} for {body['model']} ended before done", "the stream was cut",
                              "check Ollama's log and retry")
        return "".join(parts)


# ---- the model store on disk -------------------------------------------------------------------------------

def store_roots(store: str | Path | None = None) -> list[Path]:
    if store is not None:
        return [Path(store).expanduser()]
    if os.environ.get("OLLAMA_MODELS"):
        return [Path(os.environ["OLLAMA_MODELS"]).expanduser()]
    return [Path("~/.ollama/models").expanduser(), Path("/usr/share/ollama/.ollama/models")]


def parse_model_name(name: str) -> tuple[str, str, str, str]:
    """[host/][namespace/]model[:tag] -> (host, namespace, model, tag) with Ollama's defaults."""
    parts = name.strip().split("/")
    if not name.strip() or len(parts) > 3 or not all(parts):
        raise InputError(f"{name!r} is not an Ollama model name", "names look like [host/][namespace/]model[:tag]",
                         "pass e.g. llama3.2:1b, or a .gguf path")
    model, _, tag = parts[-1].partition(":")
    ns = parts[-2] if len(parts) >= 2 else "library"
    host = parts[0] if len(parts) == 3 else "registry.ollama.ai"
    return host, ns, model, tag or "latest"


def _store_models(root: Path) -> list[str]:
    base = root / "manifests"
    if not base.is_dir():
        return []
    names = []
    for f in sorted(base.glob("*/*/*/*")):
        if f.is_file():
            host, ns, model, tag = f.relative_to(base).parts
            prefix = "" if (host, ns) == ("registry.ollama.ai", "library") else \
                f"{ns}/" if host == "registry.ollama.ai" else f"{host}/{ns}/"
            names.append(f"{prefix}{model}:{tag}")
    return names


def find_model_gguf(name: str, store: str | Path | None = None) -> Path:
    """The GGUF blob of an Ollama model in the local store (the layer of mediaType ...image.model)."""
    host, ns, model, tag = parse_model_name(name)
    roots = store_roots(store)
    for root in roots:
        manifest = root / "manifests" / host / ns / model / tag
        if not manifest.is_file():
            continue
        try:
            layers = json.loads(manifest.read_text())["layers"]
            digest = next(layer["digest"] for layer in layers if layer.get("mediaType") == MODEL_MEDIA)
        except StopIteration:
            raise InputError(f"Ollama model {name} has no GGUF model layer ({manifest})",
                             "its manifest lists no layer of type application/vnd.ollama.image.model",
                             "pass the base as a .gguf path instead")
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"Ollama manifest {manifest} is not readable", f"{type(e).__name__}: {e}",
                             "re-pull the model, or pass the base as a .gguf path")
        blob = root / "blobs" / digest.replace(":", "-")
        if not blob.is_file():
            raise InputError(f"Ollama model {name} points at blob {blob.name}, which is missing from {root / 'blobs'}",
                             "the store is incomplete (an interrupted pull or a cleanup)",
                             f"run 'ollama pull {name}' again, or pass the base as a .gguf path")
        with open(blob, "rb") as f:
            if f.read(4) != b"GGUF":
                raise InputError(f"The model blob of {name} ({blob}) is not a GGUF file",
                                 "its first bytes are not the GGUF magic", "pass the base as a .gguf path instead")
        return blob
    known = [n for root in roots for n in _store_models(root)]
    raise InputError(f"Ollama model {name} is not in the local store ({', '.join(map(str, roots))})",
                     f"the store has: {', '.join(known[:20]) + (' ...' if len(known) > 20 else '')}" if known
                     else "the store has no models",
                     "pull it with 'ollama pull', set OLLAMA_MODELS to the server's store, or pass a .gguf path")


# ---- deploy ----------------------------------------------------------------------------------------------------

class AdapterIgnoredError(ServerError):
    """The new model answers exactly like its base: Ollama did not apply the adapter."""

    def __init__(self, what: str, why: str = "", fix: str = "", result: DeployResult | None = None):
        super().__init__(what, why, fix)
        self.result = result


@dataclass
class DeployResult:
    name: str
    path: str  # "adapter" (Ollama applies a GGUF LoRA) or "merged" (the adapter baked into the weights)
    reason: str
    version: str
    base: str
    blobs: dict[str, str] = field(default_factory=dict)
    check: list[dict] = field(default_factory=list)  # per prompt: prompt, base, adapted, differs
    check_model: str = ""  # the model the new one was compared with
    template: str = ""  # where the TEMPLATE / SYSTEM / PARAMETERS came from
    refused: str = ""  # Ollama's error when it refused the adapter layer (then path is "merged")

    @property
    def differs(self) -> int:
        return sum(1 for c in self.check if c["differs"])

    def to_dict(self) -> dict:
        return {**asdict(self), "differs": self.differs}


def _is_file_gguf(path: Path) -> bool:
    from ..base import is_gguf

    try:
        return path.is_file() and is_gguf(path)
    except (OSError, ValueError):  # a name too long to be a path: an Ollama model name, or nothing
        return False


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _parse_show_parameters(text: str) -> dict[str, Any]:
    """/api/show's "parameters": one `name  value` line each (values Go-quoted); stop repeats."""
    from .modelfile import group_params

    pairs = []
    for line in (text or "").splitlines():
        key, _, value = line.strip().partition(" ")
        value = value.strip()
        if not key:
            continue
        try:
            pairs.append((key, json.loads(value)))
        except ValueError:  # Go's %#v can escape what JSON does not (\x..): keep the text inside the quotes
            pairs.append((key, value[1:-1] if len(value) > 1 and value[0] == value[-1] == '"' else value))
    return group_params(pairs)


def deploy(adapter: str | Path, base: str | Path, name: str, *, client: Ollama, scale: float = 1.0,
           outtype: str = "same", prompts: Iterable[str] | None = None, store: str | Path | None = None,
           progress: Progress | None = None, merged: bool = False) -> DeployResult:
    """Make Ollama model `name` = base + adapter, then prove Ollama applies it.

    ADAPTER is a PEFT folder or a GGUF LoRA; BASE an Ollama model name (its GGUF found in the local store) or
    a base GGUF. On every Ollama with the JSON create API (>= 0.5.5) the GGUF LoRA goes in as an adapter layer
    first; when create refuses it (an error about the adapter: `refused` keeps Ollama's words), or when
    scale != 1 (Ollama applies adapters at 1.0), the adapter is merged into the base and the model is created
    from that.
    merged=True takes the merged path whatever the version.
    """
    say = progress or (lambda _msg: None)
    prompts = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
    if not prompts:
        raise InputError("No prompts for the post-deploy check", "the check compares base and new model on prompts",
                         "pass at least one prompt")
    from ..typerules import OUTTYPES

    if outtype != "same" and outtype not in OUTTYPES:
        raise InputError(f"Unknown output type {outtype!r}", "it is the tensor type of a merged model",
                         f"choose one of same, {', '.join(OUTTYPES)}")
    if scale == 0 or math.isnan(scale):
        raise InputError(f"Scale {scale:g} is not usable", "at scale 0 (or NaN) the model would be the base, or broken",
                         "pass a non-zero scale such as 1.0")
    from ..validate import usable_path

    adapter = usable_path(adapter, "Adapter ")
    if _is_file_gguf(adapter):
        if general_type(adapter) != "adapter":
            raise InputError(f"{adapter} is a GGUF but not an adapter (general.type is not 'adapter')",
                             "Ollama would silently store it as a second model instead of applying it",
                             "pass a GGUF LoRA (gguf-lora convert) or the PEFT folder")
    elif not (adapter / "adapter_config.json").is_file():
        raise InputError(f"Adapter {adapter} is neither a PEFT folder nor a GGUF LoRA file",
                         "deploy needs adapter_config.json + weights, or a .gguf with general.type=adapter",
                         "check the path")

    version = client.version()
    v = parse_version(version)
    if v < MIN_VERSION:
        raise UnsupportedError(f"Ollama {version} is too old for gguf-lora deploy",
                               "before 0.5.5 /api/create took a Modelfile text; gguf-lora speaks the JSON create API",
                               "upgrade Ollama to 0.5.5 or newer")

    base_name: str | None = None
    carried: dict[str, Any] = {}
    try:
        base_path = Path(str(base)).expanduser()
    except RuntimeError:  # ~unknown-user: not a path
        base_path = Path(str(base))
    if _is_file_gguf(base_path):
        base_gguf = base_path
        if general_type(base_gguf) == "adapter":
            raise InputError(f"Base {base_gguf} is a GGUF LoRA adapter, not a model", "", "pass the base model")
        from .modelfile import template_from_gguf

        tpl = template_from_gguf(base_gguf)
        if tpl.template:
            carried["template"] = tpl.template
        if tpl.stop:
            carried["parameters"] = {"stop": tpl.stop}
        template_note = f"from the base GGUF: {tpl.reason}"
    elif _exists(base_path) or str(base).endswith(".gguf"):
        raise InputError(f"Base {base} is not a GGUF file", "deploy takes an Ollama model name or a base .gguf",
                         "check the path")
    else:
        base_name = str(base)
        if parse_model_name(base_name) == parse_model_name(name):
            raise InputError(f"The new model {name} would replace its base {base_name}",
                             "Ollama overwrites a model created under an existing name", "choose another --name")
        info = client.show(base_name)  # also proves the server knows it
        base_gguf = None  # found in the store only when needed: a GGUF LoRA on the adapter path needs no base file
        carried = {k: info[k] for k in ("template", "system") if info.get(k)}
        params = _parse_show_parameters(info.get("parameters", ""))
        if params:
            carried["parameters"] = params
        template_note = f"carried from Ollama model {base_name}"

    if merged:
        route, reason = "merged", "a merged deploy was asked for"
    elif scale != 1.0:
        route, reason = "merged", (f"Ollama applies adapters at scale 1.0 only, so scale {scale:g} is baked in "
                                   "by merging")
    else:
        route, reason = "adapter", f"Ollama {version} took the GGUF LoRA as an adapter layer"

    blobs: dict[str, str] = {}
    refused = ""
    with tempfile.TemporaryDirectory(prefix="gguf-lora-deploy-") as tmp:
        tmp = Path(tmp)
        if route == "adapter":
            lora = adapter
            if not _is_file_gguf(adapter):
                from ..convert import convert

                say(f"converting {adapter} to a GGUF LoRA")
                base_gguf = base_gguf or find_model_gguf(base_name, store)
                lora = Path(convert(adapter, base_gguf, tmp / "adapter.gguf", outtype="f16").output)
            say("uploading the adapter")
            blobs["adapter.gguf"] = client.push_blob(lora)
            source: dict[str, Any] = {"from_": base_name} if base_name else {}
            if not base_name:
                say("uploading the base")
                blobs["model.gguf"] = client.push_blob(base_gguf)
                source = {"files": {"model.gguf": blobs["model.gguf"]}}
            try:
                client.create(name, **source, adapters={"adapter.gguf": blobs["adapter.gguf"]}, **carried,
                              progress=say)
            except ServerError as e:
                if "adapter" not in f"{e.what} {e.why}".lower():
                    raise
                refused = e.why or e.what
                route, reason = "merged", f"Ollama {version} refused the adapter ({refused}), so it is merged"
                blobs.pop("adapter.gguf")
        if route == "merged":
            from ..merge import merge

            base_gguf = base_gguf or find_model_gguf(base_name, store)
            say(f"merging {adapter} into {base_gguf.name}")
            merged = tmp / "merged.gguf"
            merge(base_gguf, [(adapter, scale)], merged, outtype=outtype)
            say("uploading the merged model")
            blobs["merged.gguf"] = client.push_blob(merged)
            merged.unlink()  # Ollama has its own copy; free the space before the check
            client.create(name, files={"merged.gguf": blobs["merged.gguf"]}, **carried, progress=say)

    result = DeployResult(name, route, reason, version, str(base), blobs, template=template_note, refused=refused)
    post_deploy_check(result, client, base_name, base_gguf, prompts, say)
    return result


def post_deploy_check(result: DeployResult, client: Ollama, base_name: str | None, base_gguf: Path | None,
                      prompts: list[str], say: Progress) -> None:
    """Greedy completions on base and new model; all equal means Ollama ignored the adapter."""
    temp = None
    if base_name is None:
        temp = f"gguf-lora-check-{uuid.uuid4().hex[:10]}"
        say("creating a temporary base model for the check")
        digest = result.blobs.get("model.gguf") or client.push_blob(base_gguf)
        client.create(temp, files={"model.gguf": digest})
    compare = base_name or temp
    try:
        say("comparing the new model with its base")
        for prompt in prompts:
            before = client.generate(compare, prompt, raw=True, options=CHECK_OPTIONS)
            after = client.generate(result.name, prompt, raw=True, options=CHECK_OPTIONS)
            result.check.append({"prompt": prompt, "base": before, "adapted": after, "differs": before != after})
    finally:
        if temp:
            try:
                client.delete(temp)
            except GgufLoraError:
                pass  # the check's answer matters more; a leftover temp model is named for what it is
    result.check_model = compare if base_name else f"{temp} (temporary, deleted)"
    if not result.differs:
        raise AdapterIgnoredError(
            f"Ollama ignored the adapter: {result.name} answers exactly like its base on all {len(prompts)} prompts",
            f"greedy completions were equal ({result.path} path, Ollama {result.version}); model {result.name} "
            "was left in place", f"remove it with 'ollama rm {result.name}', then check that the adapter changes "
            "the model (gguf-lora inspect) or deploy it merged (--merge)", result=result)
