"""The homelab examples run as a user would run them (subprocesses), on the tiny chat model and real llama-server.
(examples/deploy_ollama.py runs against the Ollama stand-in in tests/test_ollama.py.)"""
from __future__ import annotations

import configparser
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import requests

from gguf_lora.runtime.llama_server import ManagedServer, free_port

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_batch_convert_then_ab_serve(chat_model, tmp_path):
    base, _ = chat_model
    peft = base.parent / "peft"  # the PEFT folders chat_model's GGUF adapters came from
    adapters = tmp_path / "adapters"
    shutil.copytree(peft, adapters)
    (adapters / "broken").mkdir()
    (adapters / "broken" / "adapter_config.json").write_text("{not json")
    out = tmp_path / "gguf"

    first = run("batch_convert.py", adapters, "--base", base, "--out", out)
    assert first.returncode == 1, first.stderr  # one adapter failed; the others are done
    lines = first.stdout.splitlines()
    assert lines[0].startswith("FAILED     broken: ")
    assert lines[1].startswith(f"converted  poem -> {out / 'poem.gguf'} (rank 8, ")
    assert lines[2].startswith(f"converted  sql -> {out / 'sql.gguf'} (rank 8, ")
    assert lines[3] == f"2 of 3 adapters ready in {out}"
    shutil.rmtree(adapters / "broken")
    again = run("batch_convert.py", adapters, "--base", base, "--out", out)
    assert again.returncode == 0 and again.stdout.splitlines() == ["unchanged  poem", "unchanged  sql",
                                                                   f"2 of 2 adapters ready in {out}"]

    ab = run("ab_serve.py", "Write a poem about", "--base", base, "--adapters", out, "--n-predict", "8")
    assert ab.returncode == 0, ab.stderr
    rows = [line.split(" | ", 1) for line in ab.stdout.splitlines()]
    assert [name.strip() for name, _ in rows] == ["(base)", "poem", "sql"]
    assert len({text for _, text in rows}) == 3  # each adapter answers differently

    # the same A/B against a server that is already running gives the same answers
    with ManagedServer(base, out, extra_args=["-c", "2048"]) as client:
        remote = run("ab_serve.py", "Write a poem about", "--url", client.url, "--n-predict", "8")
    assert remote.returncode == 0 and remote.stdout == ab.stdout


def test_ab_serve_reports_errors(tmp_path):
    result = run("ab_serve.py", "hi", "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1 and result.stderr.startswith("error: Cannot reach llama-server at ")


def test_systemd_unit_runs_as_written(chat_model, tmp_path):
    """The unit's ExecStart, with only the paths and port swapped, starts the server; SIGTERM (the unit's
    KillSignal, as `systemctl stop` sends it) stops it cleanly within TimeoutStopSec."""
    base, adapters = chat_model
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(EXAMPLES / "gguf-lora-serve.service")
    service = unit["Service"]
    assert service["Type"] == "simple" and service["KillSignal"] == "SIGTERM" and unit["Install"]["WantedBy"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/bin/gguf-lora") and argv[1] == "serve"
    port = free_port()
    swap = {"/srv/models/base.gguf": str(base), "/srv/models/adapters": str(adapters), "8080": str(port),
            "/var/log/gguf-lora/llama-server.log": str(tmp_path / "llama-server.log")}
    argv = [sys.executable, "-m", "gguf_lora"] + [swap.get(a, a) for a in argv[1:]]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = proc.stdout.readline()
        assert ready.startswith(f"serving at http://127.0.0.1:{port}: "), proc.stderr.read()
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    finally:
        proc.send_signal(getattr(signal, service["KillSignal"]))
        proc.communicate(timeout=float(service["TimeoutStopSec"]))
    assert proc.returncode == 0
    assert (tmp_path / "llama-server.log").stat().st_size > 0
