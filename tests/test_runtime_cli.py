"""`gguf-lora serve` and `gguf-lora adapters` as a user runs them: real processes, real llama-server."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from typer.testing import CliRunner

from gguf_lora.cli import app
from gguf_lora.runtime.llama_server import free_port

runner = CliRunner()
GGUF_LORA = [sys.executable, "-m", "gguf_lora"]


def start_serve(args: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([*GGUF_LORA, "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # the ready line, or "" when it exits first
    if not line.startswith("serving at "):
        proc.kill()
        raise AssertionError(f"serve did not become ready: {line!r} {proc.stderr.read()}")
    return proc, line


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_serve_foreground_switch_and_clean_stop(chat_model, tmp_path, stop_signal):
    base, adapters = chat_model
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc, line = start_serve(["--base", str(base), "--adapters", str(adapters), "--port", str(port),
                              "--use", "poem=0.5", "--unknown-model", "selection", "--log", str(tmp_path / "server.log"),
                              "--", "-c", "256", "-t", "2"])
    try:
        assert line == f"serving at {url}: models base, poem, sql; global selection: poem=0.5\n"
        listed = runner.invoke(app, ["adapters", "list", "--url", url])
        assert listed.exit_code == 0, listed.output
        assert listed.stdout.splitlines() == [
            f"* poem                     scale 0.5    id 0  {adapters / 'poem.gguf'}",
            f"  sql                      scale 0      id 1  {adapters / 'sql.gguf'}"]
        used = runner.invoke(app, ["adapters", "use", "sql", "--url", url, "--json"])
        assert used.exit_code == 0, used.output
        assert [(a["name"], a["scale"]) for a in __import__("json").loads(used.stdout)] == [("poem", 0.0), ("sql", 1.0)]
        assert [a["scale"] for a in requests.get(url + "/lora-adapters", timeout=5).json()] == [0.0, 1.0]
        # --unknown-model selection: a request whose model names nothing gets the global selection, exactly
        assert complete(url, None) == complete(url, "sql") != complete(url, "base")
        off = runner.invoke(app, ["adapters", "use", "--none", "--url", url])
        assert off.exit_code == 0 and [a["scale"] for a in requests.get(url + "/lora-adapters").json()] == [0.0, 0.0]
        assert complete(url, "gpt-4o") == complete(url, "base") != complete(url, "sql")
        assert "-c 256" in " ".join(subprocess.run(["ps", "-ww", "-o", "args=", "--ppid", str(proc.pid)],
                                                   capture_output=True, text=True).stdout.split())
    finally:
        proc.send_signal(stop_signal)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert err.endswith("stopped\n")
    with pytest.raises(requests.ConnectionError):  # the llama-server child is gone too
        requests.get(url + "/health", timeout=2)


def complete(url: str, model: str | None) -> list:
    body = {"messages": [{"role": "user", "content": "abc def"}], "max_tokens": 4, "temperature": 0, "logprobs": True}
    r = requests.post(url + "/v1/chat/completions", json={**body, **({"model": model} if model else {})}, timeout=30)
    assert r.status_code == 200, r.text
    return [(c["id"], round(c["logprob"], 4)) for c in r.json()["choices"][0]["logprobs"]["content"]]


def test_serve_exits_non_zero_when_llama_server_dies(chat_model, tmp_path):
    base, adapters = chat_model
    proc, _ = start_serve(["--base", str(base), "--adapters", str(adapters), "--port", str(free_port()),
                           "--log", str(tmp_path / "server.log"), "--", "-c", "256"])
    try:
        child = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True).stdout
        os.kill(int(child.split()[0]), signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert err.splitlines()[-1].startswith("error: llama-server stopped unexpectedly with exit code -9. Its log ends: ")
    assert err.splitlines()[-1].endswith(f"See the full log {tmp_path / 'server.log'}.")


def test_serve_reports_the_adapter_llama_server_refused(chat_model, tmp_path):
    base, adapters = chat_model
    bad = tmp_path / "adapters"
    shutil.copytree(adapters, bad)
    retag(adapters / "sql.gguf", bad / "sql.gguf", "qwen2")  # a valid adapter, for another architecture
    result = subprocess.run([*GGUF_LORA, "serve", "--base", str(base), "--adapters", str(bad),
                             "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (f"error: llama-server refused adapter {bad / 'sql.gguf'}. Model arch and LoRA arch "
                             "mismatch. Check that the adapter was converted for this base (gguf-lora inspect "
                             "ADAPTER --base BASE).\n")
    cut = (adapters / "poem.gguf").read_bytes()
    (bad / "sql.gguf").write_bytes(cut[: len(cut) // 2])  # header intact, tensor data cut off
    result = runner.invoke(app, ["serve", "--base", str(base), "--adapters", str(bad)])
    assert result.exit_code == 1 and result.stderr.startswith(f"error: {bad / 'sql.gguf'} is not a readable GGUF "
                                                              "file. "), result.stderr


def retag(src: Path, dst: Path, arch: str) -> None:
    """Copy a GGUF with another general.architecture (gguf-py reads and writes; our code is not involved)."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_serve_input_errors(chat_model, tmp_path):
    base, adapters = chat_model
    cases = [
        (["--base", str(tmp_path / "nope.gguf")], f"error: Base model {tmp_path / 'nope.gguf'} does not exist."),
        (["--base", str(base), "--adapters", str(tmp_path)], f"error: {tmp_path} holds no GGUF LoRA adapter."),
        (["--base", str(base), "--adapters", str(base)], f"error: {base} is not a GGUF LoRA adapter."),
        (["--base", str(base), "--adapters", str(adapters), "--", "--lora", "x.gguf"],
         "error: llama-server argument --lora cannot be passed through."),
        (["--base", str(base), "--use", "sql=lots"], "error: 'sql=lots' is not NAME or NAME=SCALE."),
    ]
    for args, start in cases:
        result = runner.invoke(app, ["serve", *args])
        assert result.exit_code == 1 and result.stderr.startswith(start), (args, result.output)
    with __import__("socket").socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["serve", "--base", str(base), "--port", str(port)])
        assert result.exit_code == 1
        assert result.stderr.startswith(f"error: Cannot listen on 127.0.0.1:{port}. Address already in use.")


def test_serve_unknown_adapter_name_at_start(chat_model, tmp_path):
    base, adapters = chat_model
    t0 = time.monotonic()
    result = runner.invoke(app, ["serve", "--base", str(base), "--adapters", str(adapters), "--use", "chess",
                                 "--port", str(free_port())])
    assert result.exit_code == 1
    assert result.stderr == ("error: No adapter named 'chess' on the server. It has: poem, sql. "
                             "Use one of those names (gguf-lora adapters list).\n")
    assert time.monotonic() - t0 < 30


def test_adapters_commands_errors():
    dead = f"http://127.0.0.1:{free_port()}"
    result = runner.invoke(app, ["adapters", "list", "--url", dead])
    assert result.exit_code == 1
    assert result.stderr == (f"error: Cannot reach llama-server at {dead}. The connection was refused: nothing "
                             "listens there. Start the server or pass the right --url.\n")
    result = runner.invoke(app, ["adapters", "use", "--url", dead])
    assert result.exit_code == 2 and "name the adapters to use, or pass --none" in result.stderr
