"""Ollama: the client against a stand-in that enforces the documented contract and runs models for real
(llama-server with --lora, as Ollama >= 0.30 does); the same end-to-end test against a real Ollama when
OLLAMA_HOST is set."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import requests
import tiny
from llamacpp import free_port
from ollama_standin import StandIn, import_gguf
from typer.testing import CliRunner

from gguf_lora.cli import app
from gguf_lora.convert import convert
from gguf_lora.errors import InputError, ServerError, UnsupportedError
from gguf_lora.runtime.ollama import AdapterIgnoredError, Ollama, deploy, find_model_gguf, ollama_url, parse_model_name

PROMPTS = ["abc def", "gh ij"]  # words of the tiny tokenizer's vocabulary
ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture(scope="module")
def adapters(llama_base, tmp_path_factory):
    """A PEFT adapter on the tiny llama and its GGUF LoRA."""
    root = tmp_path_factory.mktemp("ollama_adapters")
    peft = tiny.make_adapter(llama_base[0], root / "sql", r=8)
    lora = Path(convert(peft, llama_base[1], root / "sql.gguf", outtype="f16").output)
    return peft, lora


@pytest.fixture
def standin(tmp_path):
    with StandIn(tmp_path / "ollama") as s:
        yield s


@pytest.fixture
def tiny_model(standin, llama_base):
    """The tiny base imported into the stand-in as `tiny`, with a template, a system message and parameters."""
    import_gguf(standin, llama_base[1], "tiny", template="{{ .Prompt }}", system="Be brief.",
                parameters={"stop": ["</s>", "zz"], "temperature": 0.5})
    return "tiny"


@pytest.fixture(params=["standin"] + (["real"] if os.environ.get("OLLAMA_HOST") else []))
def target(request, tmp_path):
    """An Ollama to deploy to: always the stand-in; a real one too when OLLAMA_HOST points at it."""
    if request.param == "real":
        yield Ollama()
        return
    with StandIn(tmp_path / "ollama") as s:
        yield Ollama(s.url)


# ---- deploy ---------------------------------------------------------------------------------------------------

def test_deploy_end_to_end(target, adapters, llama_base):
    """PEFT adapter + base GGUF; the adapter path where the version takes adapters, merged otherwise."""
    name = f"gguf-lora-test-{uuid.uuid4().hex[:8]}"
    result = deploy(adapters[0], llama_base[1], name, client=target, prompts=PROMPTS)
    try:
        # the adapter path is tried on every version; merged only where Ollama refused it, and then it says why
        assert (result.path, bool(result.refused)) in (("adapter", False), ("merged", True))
        assert result.differs >= 1 and len(result.check) == 2
        assert result.check_model.endswith("(temporary, deleted)")
        names = [m["name"] for m in target.list()]
        assert f"{name}:latest" in names and not any(n.startswith("gguf-lora-check-") for n in names)
        doc = result.to_dict()
        assert set(doc) >= {"name", "path", "reason", "version", "blobs", "check", "differs"}
        assert json.loads(json.dumps(doc)) == doc
    finally:
        with contextlib.suppress(ServerError):  # a failed deploy may have left nothing to delete
            target.delete(name)


def test_deploy_by_name_takes_adapter_path(standin, tiny_model, adapters):
    client = Ollama(standin.url)
    result = deploy(adapters[0], tiny_model, "tiny-sql", client=client, prompts=PROMPTS, store=standin.store)
    assert (result.path, result.version) == ("adapter", "0.12.0")
    assert result.reason == "Ollama 0.12.0 took the GGUF LoRA as an adapter layer" and result.refused == ""
    assert list(result.blobs) == ["adapter.gguf"] and result.check_model == "tiny"
    assert all(c["differs"] for c in result.check)
    shown = client.show("tiny-sql")
    blob = standin.store / "blobs" / result.blobs["adapter.gguf"].replace(":", "-")
    assert f"ADAPTER {blob}\n" in shown["modelfile"]
    assert shown["template"] == "{{ .Prompt }}" and shown["system"] == "Be brief."
    assert shown["parameters"].splitlines() == [f"{'stop':<30} \"</s>\"", f"{'stop':<30} \"zz\"",
                                                f"{'temperature':<30} 0.5"]
    # the check's numbers are the model's: greedy, so asking again gives the same text
    options = {"temperature": 0, "seed": 1, "top_k": 1, "num_predict": 8}
    assert client.generate("tiny-sql", PROMPTS[0], raw=True, options=options) == result.check[0]["adapted"]
    assert client.generate("tiny", PROMPTS[0], raw=True, options=options) == result.check[0]["base"]


def test_gguf_lora_by_name_needs_no_local_store(standin, tiny_model, adapters, tmp_path):
    """A GGUF LoRA on the adapter path never reads the base file, so a remote Ollama's store is not needed."""
    result = deploy(adapters[1], tiny_model, "tiny-sql", client=Ollama(standin.url), prompts=PROMPTS,
                    store=tmp_path / "not-a-store")
    assert result.path == "adapter" and result.differs == 2
    with pytest.raises(InputError, match="Ollama model tiny is not in the local store"):
        deploy(adapters[0], tiny_model, "tiny-sql", client=Ollama(standin.url), store=tmp_path / "not-a-store")


def test_show_parameters_are_read_back():
    from gguf_lora.runtime.ollama import _parse_show_parameters

    text = ('stop                           "<|im_end|>"\nstop                           "\\x01odd"\n'
            'temperature                    0.7\nnum_ctx                        4096')
    assert _parse_show_parameters(text) == {"stop": ["<|im_end|>", "\\x01odd"], "temperature": 0.7, "num_ctx": 4096}


def test_deploy_merges_where_version_refuses_adapters(standin, tiny_model, adapters, monkeypatch, tmp_path):
    standin.version = "0.34.1"
    client = Ollama(standin.url)
    with pytest.raises(ServerError, match="reported an error.*Adapters are not supported"):  # the stand-in refuses like Ollama
        client.create("x", from_="tiny", adapters={"a.gguf": client.push_blob(adapters[1])})
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    result = deploy(adapters[0], tiny_model, "tiny-sql", client=client, prompts=PROMPTS, store=standin.store)
    assert result.path == "merged" and result.reason.startswith("Ollama 0.34.1 refused the adapter (adapters are "
                                                                "not supported by this version")
    assert result.refused.startswith("adapters are not supported")
    assert list(result.blobs) == ["merged.gguf"] and result.differs == 2
    assert list(scratch.iterdir()) == []  # the merged GGUF and its folder are gone
    shown = client.show("tiny-sql")
    assert "ADAPTER" not in shown["modelfile"] and shown["system"] == "Be brief."


def test_newer_ollama_that_takes_adapters_gets_the_adapter_path(standin, tiny_model, adapters):
    """The refusal from 0.34.1 is reported, not known: a newer Ollama that takes GGUF adapters through the API
    gets them as an adapter layer (and the post-deploy check proves they are applied)."""
    standin.version, standin.new_refuse = "0.35.2", False
    result = deploy(adapters[0], tiny_model, "tiny-sql", client=Ollama(standin.url), prompts=PROMPTS,
                    store=standin.store)
    assert (result.path, result.refused, result.differs) == ("adapter", "", 2)
    assert result.reason == "Ollama 0.35.2 took the GGUF LoRA as an adapter layer"
    assert "ADAPTER " in Ollama(standin.url).show("tiny-sql")["modelfile"]


def test_deploy_falls_back_when_create_refuses_the_adapter(standin, tiny_model, adapters):
    standin.refuse_adapters = "this build cannot load adapter layers"
    result = deploy(adapters[0], tiny_model, "tiny-sql", client=Ollama(standin.url), prompts=PROMPTS,
                    store=standin.store)
    assert result.path == "merged" and "refused the adapter (this build cannot load adapter layers)" in result.reason
    assert result.differs == 2


def test_scale_other_than_one_is_merged(standin, adapters, llama_base):
    result = deploy(adapters[1], llama_base[1], "tiny-half", client=Ollama(standin.url), scale=0.5, prompts=PROMPTS)
    assert result.path == "merged" and "scale 0.5 is baked in" in result.reason
    assert result.differs >= 1 and set(result.blobs) == {"merged.gguf"}


def test_check_catches_an_ollama_that_ignores_the_adapter(standin, tiny_model, adapters):
    standin.ignore_adapters = True
    client = Ollama(standin.url)
    with pytest.raises(AdapterIgnoredError, match="Ollama ignored the adapter: tiny-sql answers exactly like its "
                                                  "base on all 2 prompts") as info:
        deploy(adapters[0], tiny_model, "tiny-sql", client=client, prompts=PROMPTS, store=standin.store)
    assert "was left in place" in str(info.value) and "ollama rm tiny-sql" in str(info.value)
    assert info.value.result.path == "adapter" and not any(c["differs"] for c in info.value.result.check)
    assert "tiny-sql:latest" in [m["name"] for m in client.list()]


def test_old_ollama_is_refused(standin, adapters, llama_base):
    standin.version = "0.5.4"
    with pytest.raises(UnsupportedError, match="Ollama 0.5.4 is too old.*Upgrade Ollama to 0.5.5"):
        deploy(adapters[0], llama_base[1], "x", client=Ollama(standin.url))


def test_deploy_input_errors(standin, adapters, llama_base, tmp_path):
    client = Ollama(standin.url)
    with pytest.raises(InputError, match="neither a PEFT folder nor a GGUF LoRA"):
        deploy(tmp_path / "missing", llama_base[1], "x", client=client)
    with pytest.raises(InputError, match="is a GGUF but not an adapter"):
        deploy(llama_base[1], llama_base[1], "x", client=client)
    with pytest.raises(InputError, match="Base .*nope.gguf is not a GGUF file"):
        deploy(adapters[0], tmp_path / "nope.gguf", "x", client=client)
    with pytest.raises(ServerError, match=r"Ollama at http://127.0.0.1:\d+ has no model llama3.2:1b. Model "
                                         r"'llama3.2:1b' not found. Pull it with 'ollama pull llama3.2:1b'"):
        deploy(adapters[0], "llama3.2:1b", "x", client=client)
    with pytest.raises(InputError, match="The new model tiny:latest would replace its base tiny"):
        deploy(adapters[0], "tiny", "tiny:latest", client=client)
    with pytest.raises(InputError, match="Unknown output type 'q9'"):
        deploy(adapters[0], llama_base[1], "x", client=client, outtype="q9")
    with pytest.raises(InputError, match="Scale 0 is not usable"):
        deploy(adapters[0], llama_base[1], "x", client=client, scale=0)
    assert standin.uploads == []  # nothing was sent before the inputs were known good


# ---- the client -----------------------------------------------------------------------------------------------

def test_push_blob_uploads_only_when_missing(standin, adapters):
    client = Ollama(standin.url)
    expected = "sha256:" + hashlib.sha256(adapters[1].read_bytes()).hexdigest()
    assert not client.has_blob(expected)
    assert client.push_blob(adapters[1]) == expected and client.has_blob(expected)
    assert client.push_blob(adapters[1]) == expected
    assert standin.uploads == [expected]  # the second push was a HEAD only


def test_digest_mismatch(standin, adapters):
    wrong = "sha256:" + "0" * 64
    r = requests.post(f"{standin.url}/api/blobs/{wrong}", data=b"hello", timeout=10)
    got = "sha256:" + hashlib.sha256(b"hello").hexdigest()
    assert r.status_code == 400 and r.json() == {"error": f'digest mismatch, expected "{wrong}", got "{got}"'}
    with pytest.raises(ServerError, match="refused .*sql.gguf as blob sha256:00000000000.*Digest mismatch"):
        Ollama(standin.url).push_blob(adapters[1], digest=wrong)
    assert standin.uploads == []


def test_create_is_validated_like_ollama(standin, tiny_model, llama_base):
    client = Ollama(standin.url)
    url = f"{standin.url}/api/create"
    r = requests.post(url, json={"model": "m"}, timeout=10)
    assert (r.status_code, r.json()) == (400, {"error": "neither 'from' or 'files' was specified"})
    with pytest.raises(ServerError, match=r"rejected POST /api/create \(400\)\. File path must be relative"):
        client.create("m", files={"/etc/model.gguf": "sha256:" + "1" * 64})
    # an error after progress lines arrives as one more NDJSON line under HTTP 200
    r = requests.post(url, json={"model": "m", "files": {"m.gguf": "sha256:" + "1" * 64}}, timeout=10)
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert r.status_code == 200 and lines[0] == {"status": "parsing GGUF"} and "no such file" in lines[-1]["error"]
    with pytest.raises(ServerError, match="reported an error during POST /api/create.*no such file or directory"):
        client.create("m", files={"m.gguf": "sha256:" + "1" * 64})
    with pytest.raises(ServerError, match="Pull model manifest: file does not exist"):
        client.create("m", from_="not-here")
    with pytest.raises(ServerError, match="unknown option 'temprature'"):
        client.create("m", from_="tiny", parameters={"temprature": 0.1})
    standin.cut_create = True
    with pytest.raises(ServerError, match="ended without success.*Last status: 'using existing layer"):
        client.create("m", from_="tiny")
    standin.cut_create = False
    client.create("m", from_="tiny")
    assert sorted(m["name"] for m in client.list()) == ["m:latest", "tiny:latest"]
    assert requests.post(f"{standin.url}/api/copy", json={"source": "m", "destination": "n:v2"},
                         timeout=10).status_code == 200
    r = requests.post(f"{standin.url}/api/copy", json={"source": "ghost", "destination": "n"}, timeout=10)
    assert r.status_code == 404 and "not found" in r.json()["error"]
    assert client.show("n:v2")["modelfile"] == client.show("m")["modelfile"]


def test_adapters_stack_through_from_and_plain_ggufs_become_model_layers(standin, tiny_model, adapters, llama_base):
    client = Ollama(standin.url)
    lora, model = client.push_blob(adapters[1]), client.push_blob(llama_base[1])
    client.create("one", from_="tiny", adapters={"a.gguf": lora})
    client.create("two", from_="one", adapters={"b.gguf": lora})
    assert client.show("two")["modelfile"].count("\nADAPTER ") == 2
    client.create("odd", from_="tiny", adapters={"base.gguf": model})  # no general.type=adapter: a second model
    manifest = json.loads((standin.store / "manifests/registry.ollama.ai/library/odd/latest").read_text())
    assert [la["mediaType"].rsplit(".", 1)[1] for la in manifest["layers"]].count("model") == 2
    assert "ADAPTER" not in client.show("odd")["modelfile"]


def test_unknown_models_are_404(standin):
    client = Ollama(standin.url)
    for call in (lambda: client.show("ghost"), lambda: client.delete("ghost"),
                 lambda: client.generate("ghost", "hi"), lambda: client.chat("ghost", [])):
        with pytest.raises(ServerError, match=r"has no model ghost\. Model .ghost. not found"):
            call()


def test_generate_and_chat(standin, tiny_model):
    client = Ollama(standin.url)
    opts = {"temperature": 0, "num_predict": 6}
    streamed = client.generate("tiny", "abc", raw=True, options=opts, stream=True)
    assert streamed == client.generate("tiny", "abc", raw=True, options=opts, stream=False) and streamed
    reply = client.chat("tiny", [{"role": "user", "content": "abc def"}], options=opts)
    assert isinstance(reply, str) and reply == client.chat("tiny", [{"role": "user", "content": "abc def"}],
                                                           options=opts, stream=True)
    client.delete("tiny")
    assert client.list() == [] and list((standin.store / "blobs").iterdir()) == []  # unused blobs pruned


def test_answers_that_are_not_json(standin):
    standin.garbage = {"/api/version", "/api/tags"}
    client = Ollama(standin.url)
    with pytest.raises(ServerError, match="answered GET /api/version with something that is not JSON"):
        client.version()
    with pytest.raises(ServerError, match="not JSON"):
        client.list()


def test_unreachable_server():
    client = Ollama(f"127.0.0.1:{free_port()}")
    with pytest.raises(ServerError, match="Cannot reach Ollama at http://127.0.0.1:.*refused"):
        client.version()


@pytest.mark.parametrize("value, url", [
    ("", "http://127.0.0.1:11434"), ("nas", "http://nas:11434"), ("nas:8080", "http://nas:8080"),
    (":9999", "http://127.0.0.1:9999"), ("0.0.0.0", "http://127.0.0.1:11434"), ("http://nas", "http://nas:80"),
    ("https://ollama.lan/", "https://ollama.lan:443"), ("[::1]:7", "http://[::1]:7"),
    ("http://h:1/prefix", "http://h:1/prefix"),
])
def test_ollama_host_forms(value, url, monkeypatch):
    assert ollama_url(value) == url
    monkeypatch.setenv("OLLAMA_HOST", value)
    assert Ollama().url == url


# ---- the store on disk ----------------------------------------------------------------------------------------

def test_find_base_in_store(standin, tiny_model, llama_base):
    blob = find_model_gguf("tiny", standin.store)
    assert blob.read_bytes() == llama_base[1].read_bytes()
    for name in ("tiny:latest", "library/tiny", "registry.ollama.ai/library/tiny:latest"):
        assert find_model_gguf(name, standin.store) == blob
    assert parse_model_name("host:5000/me/m:q4") == ("host:5000", "me", "m", "q4")


def test_store_errors(standin, tiny_model, monkeypatch, tmp_path):
    store = standin.store
    with pytest.raises(InputError, match="Ollama model other is not in the local store .* The store has: tiny:latest"):
        find_model_gguf("other", store)
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "empty"))
    with pytest.raises(InputError, match=f"not in the local store \\({tmp_path / 'empty'}\\). The store has no models"):
        find_model_gguf("tiny")
    manifest = store / "manifests/registry.ollama.ai/library/tiny/latest"
    doc = json.loads(manifest.read_text())
    model = next(la for la in doc["layers"] if la["mediaType"].endswith(".model"))
    blob = store / "blobs" / model["digest"].replace(":", "-")
    blob.write_bytes(b"NOPE" + blob.read_bytes()[4:])
    with pytest.raises(InputError, match="is not a GGUF file"):
        find_model_gguf("tiny", store)
    blob.unlink()
    with pytest.raises(InputError, match="points at blob sha256-.* which is missing.*ollama pull tiny"):
        find_model_gguf("tiny", store)
    manifest.write_text(json.dumps({**doc, "layers": [la for la in doc["layers"] if la is not model]}))
    with pytest.raises(InputError, match="has no GGUF model layer"):
        find_model_gguf("tiny", store)


# ---- the CLI and the example ----------------------------------------------------------------------------------


def test_cli_deploy(standin, tiny_model, adapters):
    args = ["ollama", "deploy", str(adapters[0]), "--base", "tiny", "--name", "tiny-sql", "--url", standin.url,
            "--store", str(standin.store), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]]
    result = runner.invoke(app, args + ["--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["path"] == "adapter" and doc["differs"] == 2 and doc["name"] == "tiny-sql"
    result = runner.invoke(app, args + ["--merge"])
    assert result.exit_code == 0, result.output
    assert result.stdout == ("created tiny-sql on Ollama 0.12.0: merged path (a merged deploy was asked for)\n"
                             "  check: 2 of 2 prompts answer differently from tiny; the adapter is applied\n")
    assert "comparing the new model with its base" in result.stderr


def test_cli_deploy_errors(standin, tiny_model, adapters):
    base = ["ollama", "deploy", str(adapters[0]), "--base", "tiny", "--name", "tiny-sql", "--store",
            str(standin.store), "--prompt", PROMPTS[0]]
    port = free_port()
    result = runner.invoke(app, base + ["--url", f"127.0.0.1:{port}"])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == (f"error: Cannot reach Ollama at http://127.0.0.1:{port}. The connection was refused: "
                             "nothing listens there. Start the server or pass the right --url.\n")
    standin.ignore_adapters = True
    result = runner.invoke(app, base + ["--url", standin.url, "--json"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)  # the evidence, for scripts
    assert doc["differs"] == 0 and doc["error"].startswith("Ollama ignored the adapter")
    assert result.stderr.startswith("error: Ollama ignored the adapter") and result.stderr.count("\n") == 1


def test_example_script(standin, tiny_model, adapters):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "deploy_ollama.py"), str(adapters[0]),
                           "--base", "tiny", "--name", "tiny-sql", "--url", standin.url, "--store", str(standin.store),
                           "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("tiny-sql: adapter path on Ollama 0.12.0")
    assert lines[-1] == "check passed: 2 of 2 prompts changed; try it: ollama run tiny-sql"


def test_standin_stops_its_runners(tmp_path, llama_base):
    with StandIn(tmp_path / "ollama") as s:
        import_gguf(s, llama_base[1], "tiny")
        Ollama(s.url).generate("tiny", "abc", raw=True, options={"temperature": 0, "num_predict": 2})
        procs = [server.proc for _, server in s.runners.values()]
    assert len(procs) == 1 and procs[0].poll() is not None
