"""`just demo-serve`: one base, two adapters, switched at runtime, each asked the same thing.

Starts `gguf-lora serve` with the tiny base and the two converted adapters (as `just demo` writes them). First
each client picks its adapter by `model`, the OpenAI way (what an OpenAI SDK or Open WebUI sends); then, with
`--unknown-model selection`, `gguf-lora adapters use` switches what requests that name no model get (a plain curl
request). Prints each answer, then stops the server as Ctrl-C does. Every command is printed as you would type it.
Needs the pinned llama-server (`just llama-cpp`). DEMO_OUT (default examples/tiny/out) is for tests.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = Path("examples/tiny")
OUT = Path(os.environ.get("DEMO_OUT", TINY / "out"))
CLI = [sys.executable, "-m", "gguf_lora"]
PROMPT = "Tell me about the sea:"
READY_TIMEOUT = 120.0
BASE_MODEL = "base"  # serve names the bare base after its file: base.gguf


def say(*args: str) -> None:
    print("$", *args, flush=True)


def gguf_lora(*args: str, quiet: bool = False) -> subprocess.CompletedProcess:
    if not quiet:
        say("gguf-lora", *args)
    done = subprocess.run([*CLI, *args], cwd=ROOT, capture_output=True, text=True)
    if not quiet:
        print(done.stdout, end="", flush=True)
    return done


def complete(url: str, model: str | None = None) -> str:
    """A completion as curl sends it: to /v1/completions naming a model, else to /completion with no model."""
    body = {**({"model": model} if model else {}), "prompt": PROMPT, "max_tokens": 18, "temperature": 0}
    path = "/v1/completions" if model else "/completion"
    say(f"curl -s {url}{path} -d '{json.dumps(body)}'")
    request = urllib.request.Request(f"{url}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        doc = json.load(r)
    return doc["choices"][0]["text"] if model else doc["content"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    base, adapters = TINY / "base.gguf", OUT / "adapters"
    adapters.mkdir(parents=True, exist_ok=True)
    for name in ("sql", "poem"):
        done = gguf_lora("convert", str(TINY / "adapters" / name), "--base", str(base), "-o",
                         str(adapters / f"{name}.gguf"), "--force")
        if done.returncode:
            print(done.stderr, end="", file=sys.stderr)
            return 1
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve_args = ["serve", "--base", str(base), "--adapters", str(adapters), "--port", str(port),
                  "--unknown-model", "selection"]
    say("gguf-lora", *serve_args, "&")
    serve = subprocess.Popen([*CLI, *serve_args],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        code = switch_and_ask(serve, url)
    finally:
        print("stopping gguf-lora serve (as Ctrl-C does)", flush=True)
        serve.send_signal(signal.SIGINT)
        try:
            _, err = serve.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            serve.kill()
            _, err = serve.communicate()
            print("error: gguf-lora serve did not stop within 30 s; killed", file=sys.stderr)
            code = 1
    if code and err.strip():
        print(f"gguf-lora serve said:\n{err.strip()}", file=sys.stderr)
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            print(f"error: something still listens on port {port} after serve stopped", file=sys.stderr)
            code = 1
    return code


def switch_and_ask(serve: subprocess.Popen, url: str) -> int:
    # ready when it takes the first switch; until then it refuses or answers 503 while loading
    deadline = time.monotonic() + READY_TIMEOUT
    while (first := gguf_lora("adapters", "use", "sql", "--url", url, quiet=True)).returncode:
        if serve.poll() is not None or time.monotonic() > deadline:
            print(f"error: gguf-lora serve did not come up: {first.stderr.strip()}", file=sys.stderr)
            return 1
        time.sleep(0.5)
    answers, by_model = {}, {}
    try:
        print("Each request names its adapter (the base by its own name):", flush=True)
        for name in ("sql", "poem", BASE_MODEL):
            by_model[name] = complete(url, name)
            print(f"  -> {by_model[name]!r}\n", flush=True)
        print("Requests that name no model get the global selection, switched on the running server:", flush=True)
        for name in ("sql", "poem", None):
            gguf_lora("adapters", "use", *([name] if name else ["--none"]), "--url", url)
            answers[name or "(base)"] = complete(url)
            print(f"  -> {answers[name or '(base)']!r}\n", flush=True)
    except (OSError, urllib.error.URLError, KeyError, ValueError) as e:
        print(f"error: the request failed: {e}", file=sys.stderr)
        return 1
    if len(set(answers.values())) < len(answers) or len(set(by_model.values())) < len(by_model):
        print("error: two selections gave the same answer: the switch did not take effect", file=sys.stderr)
        return 1
    if [by_model["sql"], by_model["poem"], by_model[BASE_MODEL]] != list(answers.values()):
        print("error: an adapter chosen by model answered otherwise than the same adapter chosen globally",
              file=sys.stderr)
        return 1
    print("Three models, three answers, the same whether named per request or switched globally.")
    return 0

if __name__ == "__main__":
    sys.exit(main())
