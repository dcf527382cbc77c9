"""Interruptions and hostile filesystems, in real processes.

Signals: SIGTERM (systemd, `timeout`, CI cancellation), SIGHUP (a closed terminal) and SIGINT (Ctrl-C) sent at
seeded random points of `merge` and `quantize` on a model big enough to take a few seconds. Whenever it
lands, nothing partial is left: the temporary file is gone, the output is absent or complete, the input is
unchanged, and the exit code is 128 + the signal number with one line on stderr (or 0 when the signal came
after the output was complete).

Filesystems: a read-only folder and a full one are real tmpfs mounts (this suite runs as root in CI); where
mounting is not permitted, "full" falls back to RLIMIT_FSIZE and "read-only" to a read-only mount the system
already has (or chmod when not root). Which one ran is printed in the test's output.
"""
from __future__ import annotations

import hashlib
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import gguf
import pytest

import tiny
from llamacpp import hf_to_gguf

pytestmark = pytest.mark.llama_cpp
ROOT = Path(__file__).resolve().parents[1]
GGUF_LORA = [sys.executable, "-m", "gguf_lora"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
RUNS = int(os.environ.get("GGUF_LORA_SIGNAL_RUNS", "2"))  # random points per (command, signal)
SIGNALS = [signal.SIGTERM, signal.SIGHUP, signal.SIGINT]


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A 38 MB F32 llama (4 layers, hidden 512) written by llama.cpp's converter, and an adapter for it:
    merge and quantize take a few seconds, long enough to be interrupted anywhere."""
    root = tmp_path_factory.mktemp("big")
    tiny.make_base("llama", root / "hf", hidden_size=512, intermediate_size=1024, num_hidden_layers=4, head_dim=64,
                   num_attention_heads=8, num_key_value_heads=4)
    base = hf_to_gguf(root / "hf", root / "base.gguf")
    adapter = tiny.make_adapter(root / "hf", root / "adapter", r=8)
    return base, adapter


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def handles_term(pid: int) -> bool:
    """The process has Python handlers for SIGTERM: the command is running inside its cleanup guard."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("SigCgt:")), 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


def command(kind: str, base: Path, adapter: Path, out: Path) -> list[str]:
    if kind == "merge":
        return [*GGUF_LORA, "merge", "--base", str(base), str(adapter), "-o", str(out), "--outtype", "q8_0"]
    return [*GGUF_LORA, "quantize", str(base), str(out), "q8_0"]


def start(kind: str, base: Path, adapter: Path, out: Path) -> subprocess.Popen:
    """The command, returned once it runs inside its cleanup guard (its SIGTERM handler is installed)."""
    proc = subprocess.Popen(command(kind, base, adapter, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    deadline = time.monotonic() + 60
    while not handles_term(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    return proc


@pytest.fixture(scope="module")
def work_time(big, tmp_path_factory):
    """How long each command works once inside its guard, until its output is renamed into place: the random
    points are spread over that span."""
    base, adapter = big
    spans = {}
    for kind in ("merge", "quantize"):
        out = tmp_path_factory.mktemp(f"ref-{kind}") / "o.gguf"
        proc = start(kind, base, adapter, out)
        t0 = time.monotonic()
        while not out.exists() and proc.poll() is None:
            time.sleep(0.002)
        spans[kind] = (time.monotonic() - t0) * 1.1  # a few signals land just after the rename, on purpose
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    return spans


CASES = [(kind, sig, i) for kind in ("merge", "quantize") for sig in SIGNALS for i in range(RUNS)]


@pytest.mark.parametrize("kind,sig,run", CASES, ids=[f"{k}-{s.name}-{i}" for k, s, i in CASES])
def test_signal_at_a_random_point_leaves_nothing_partial(big, work_time, tmp_path, kind, sig, run):
    base, adapter = big
    before = sha(base)
    rng = random.Random(f"{kind}-{sig}-{run}")
    out = tmp_path / "out" / "o.gguf"
    out.parent.mkdir()
    proc = start(kind, base, adapter, out)
    time.sleep(rng.uniform(0, work_time[kind]))  # reading, planning, encoding, writing, renaming
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    leftovers = [p.name for p in out.parent.iterdir() if p.name != out.name]
    assert leftovers == [], f"left behind: {leftovers}"
    assert sha(base) == before
    assert "Traceback" not in stderr, stderr
    if out.exists():  # the signal came after the rename: the output is complete
        assert len(gguf.GGUFReader(out).tensors) > 0
        # finished, or stopped by the signal while printing / exiting (Python's default once the guard is left)
        assert proc.returncode in (0, -sig, 128 + sig), (proc.returncode, stderr)
        outcome = "finished first"
    else:
        assert proc.returncode == 128 + sig, (proc.returncode, stderr)
        assert stderr == (f"error: Interrupted by {sig.name}. Nothing was written (no partial file is left); "
                          "run the command again.\n"), stderr
        outcome = "interrupted"
    print(f"{kind} {sig.name} run {run} after {work_time[kind]:.1f} s of work: {outcome}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_from_the_first_instant(big, tmp_path, sig):
    """Before the command runs (interpreter start-up, imports) Python's default applies: the process is
    killed by the signal (the shell reports 128+n too) and nothing has been written."""
    base, adapter = big
    out = tmp_path / "out" / "o.gguf"
    out.parent.mkdir()
    for delay in (0.0, 0.3, 1.0):
        proc = subprocess.Popen(command("quantize", base, adapter, out), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=ENV)
        time.sleep(delay)  # noqa: the first instants: interpreter start-up and imports
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode in (-sig, 128 + sig, 0), (proc.returncode, stderr)
        assert "Traceback" not in stderr
        assert [p.name for p in out.parent.iterdir() if p.name != out.name] == []
        out.unlink(missing_ok=True)


# ---- read-only and full filesystems -------------------------------------------------------------------------

@contextmanager
def tmpfs(options: str):
    """A tmpfs mounted for the test and unmounted after; None when this machine does not allow mounting."""
    where = Path(tempfile.mkdtemp(prefix="gguf-lora-tmpfs-"))
    ok = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                                              capture_output=True).returncode == 0
    try:
        yield where if ok else None
    finally:
        if ok:
            if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(where)], capture_output=True)
        where.rmdir()


def existing_read_only_folder() -> Path | None:
    for line in Path("/proc/mounts").read_text().splitlines():
        _, point, _, opts, *_ = line.split()
        if "ro" in opts.split(",") and os.path.isdir(point) and not os.access(point, os.W_OK):
            return Path(point)
    return None


@pytest.fixture(scope="module")
def small(llama_base, tmp_path_factory):
    return tiny.make_adapter(llama_base[0], tmp_path_factory.mktemp("small") / "a", r=4)


def run(args: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*GGUF_LORA, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=120, **kw)


def test_read_only_output_folder(small, llama_base, capsys):
    with tmpfs("ro,size=64k") as folder:
        how = "a read-only tmpfs mount"
        if folder is None:
            folder = existing_read_only_folder()
            how = f"the system's read-only mount {folder}"
        assert folder is not None, "no read-only folder can be made or found"
        with capsys.disabled():
            print(f"\n  read-only output folder: {how}")
        for args in (["convert", small, "--base", llama_base[1], "-o", folder / "o.gguf"],
                     ["quantize", llama_base[1], folder / "o.gguf", "q8_0"],
                     ["modelfile", "--from", "tiny", "-o", folder / "Modelfile"]):
            proc = run(args)
            assert proc.returncode == 1, proc.stderr
            assert proc.stderr.startswith(f"error: Cannot write in {folder} (Read-only file system).") \
                or "Permission denied" in proc.stderr, proc.stderr
            assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_full_output_folder(small, llama_base, capsys):
    with tmpfs("size=8k") as folder:
        if folder is None:
            with capsys.disabled():
                print("\n  full output folder: mounting is not permitted; RLIMIT_FSIZE stands in for a full disk")
            folder = Path(tempfile.mkdtemp())

            def limit():
                resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        else:
            with capsys.disabled():
                print("\n  full output folder: an 8 kB tmpfs mount")
            limit = None
        for args in (["convert", small, "--base", llama_base[1], "-o", folder / "o.gguf", "--outtype", "f32"],
                     ["quantize", llama_base[1], folder / "o.gguf", "f32"]):
            proc = run(args, preexec_fn=limit)
            assert proc.returncode == 1, proc.stderr
            assert proc.stderr.startswith(f"error: Writing {folder / 'o.gguf'} failed:"), proc.stderr
            assert "nothing was written" in proc.stderr and proc.stderr.count("\n") == 1
            assert list(folder.iterdir()) == []


def test_ollama_deploy_removes_its_temporary_files_on_sigterm(small, llama_base, tmp_path):
    """deploy converts or merges into a temporary folder before uploading; SIGTERM mid-upload removes it."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    uploading, stop = threading.Event(), threading.Event()

    class SlowOllama(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = b'{"version": "0.6.0"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def do_POST(self):  # the blob upload: never read, never answered
            uploading.set()
            stop.wait(60)

    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowOllama)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    try:
        proc = subprocess.Popen([*GGUF_LORA, "ollama", "deploy", str(small), "--base", str(llama_base[1]), "--name",
                                 "x", "--merge", "--url", f"http://127.0.0.1:{server.server_address[1]}"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**ENV, "TMPDIR": str(tmp)})
        assert uploading.wait(120), proc.communicate(timeout=5)
        assert list(tmp.iterdir()), "the merged model should be in the temporary folder while it uploads"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.splitlines()[-1].startswith("error: Interrupted by SIGTERM."), stderr
    assert "Traceback" not in stderr
    assert list(tmp.iterdir()) == []
