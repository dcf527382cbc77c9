"""Modelfiles: quoting Ollama reads back unchanged (and refusal of what it cannot), paths, and the TEMPLATE +
stop words derived from a base GGUF written by llama.cpp's own converter."""
from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from gguf_lora.cli import app
from gguf_lora.errors import InputError, OutputError
from gguf_lora.runtime.modelfile import (
    FAMILIES,
    family_of,
    group_params,
    modelfile,
    parse_param,
    quote,
    template_from_gguf,
    write_modelfile,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def chatml_base(llama_base, tmp_path_factory):
    """The tiny llama with a chatml chat template in tokenizer_config.json, converted by llama.cpp."""
    from llamacpp import hf_to_gguf

    root = tmp_path_factory.mktemp("chatml")
    hf = root / "hf"
    shutil.copytree(llama_base[0], hf)
    cfg = json.loads((hf / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (hf / "tokenizer_config.json").write_text(json.dumps(cfg))
    return hf_to_gguf(hf, root / "chatml.gguf")


@pytest.mark.parametrize("value, written", [
    ("plain", "plain"),
    ("two words", "two words"),
    ("line one\nline two", '"""line one\nline two"""'),
    (" leading", '""" leading"""'),
    ("trailing ", '"""trailing """'),
    ('say "hi" now', '"""say "hi" now"""'),
    ("", '""""""'),
])
def test_quote(value, written):
    assert quote(value) == written


@pytest.mark.parametrize("value", ['has """ inside', 'ends in a quote"'])
def test_quote_refuses_what_modelfiles_cannot_carry(value):
    with pytest.raises(InputError, match='cannot be written in a Modelfile.*contains """ or ends in "'):
        quote(value, "system message")


def test_modelfile_text_and_relative_paths(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base.gguf").write_bytes(b"GGUF")
    text = modelfile(tmp_path / "sub" / "base.gguf", tmp_path / "a.gguf", template="{{ .Prompt }}",
                     system="You are terse.\nAnswer in SQL.", parameters={"stop": ["<|im_end|>", "</s>"],
                                                                           "temperature": 0.2},
                     messages=[{"role": "user", "content": "hi"}], license="MIT", folder=tmp_path)
    assert text == ("FROM ./sub/base.gguf\n"
                    "ADAPTER ./a.gguf\n"
                    "TEMPLATE {{ .Prompt }}\n"
                    'SYSTEM """You are terse.\nAnswer in SQL."""\n'
                    "PARAMETER stop <|im_end|>\n"
                    "PARAMETER stop </s>\n"
                    "PARAMETER temperature 0.2\n"
                    "MESSAGE user hi\n"
                    "LICENSE MIT\n")


def test_modelfile_names_and_outside_paths(tmp_path):
    outside = tmp_path / "models" / "base.gguf"
    outside.parent.mkdir()
    outside.write_bytes(b"GGUF")
    assert modelfile("llama3.2:1b", folder=tmp_path / "here") == "FROM llama3.2:1b\n"
    assert modelfile(outside, folder=tmp_path / "here") == f"FROM {outside}\n"


def test_modelfile_refuses_bad_parts():
    with pytest.raises(InputError, match="Message role 'robot' is not valid"):
        modelfile("m", messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(InputError, match="Parameter name 'bad key' is not valid"):
        modelfile("m", parameters={"bad key": 1})
    with pytest.raises(InputError, match="template"):
        modelfile("m", template='{{ .Prompt }}"""')


def test_params_parse_and_accumulate():
    pairs = [parse_param(p) for p in ["temperature=0.7", "num_ctx=4096", "stop=<|im_end|>", "stop=</s>",
                                      "use_mmap=false"]]
    assert group_params(pairs) == {"temperature": 0.7, "num_ctx": 4096, "stop": ["<|im_end|>", "</s>"],
                                   "use_mmap": False}
    with pytest.raises(InputError, match="is not key=value"):
        parse_param("temperature")


def test_write_modelfile_is_atomic_and_keeps_existing(tmp_path):
    out = write_modelfile(tmp_path / "Modelfile", "FROM x\n")
    assert out.read_text() == "FROM x\n" and [p.name for p in tmp_path.iterdir()] == ["Modelfile"]
    with pytest.raises(OutputError, match="already exists"):
        write_modelfile(tmp_path / "Modelfile", "FROM y\n")
    write_modelfile(tmp_path / "Modelfile", "FROM y\n", force=True)
    assert out.read_text() == "FROM y\n"


def test_tiny_base_has_no_chat_template(llama_base):
    """The tiny tokenizer carries no chat template: no TEMPLATE, and the result says why; eos still stops."""
    derived = template_from_gguf(llama_base[1])
    assert derived.family is None and derived.template is None
    assert derived.stop == ["</s>"]  # token 2, eos of the tiny sentencepiece vocabulary
    assert "no tokenizer.chat_template" in derived.reason


def test_chatml_base_maps_to_ollama_template(chatml_base):
    derived = template_from_gguf(chatml_base)
    assert derived.family == "chatml" and derived.template == FAMILIES["chatml"]["template"]
    assert derived.stop == ["<|im_start|>", "<|im_end|>", "</s>"]


@pytest.mark.parametrize("family, jinja", [
    ("llama3", "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}{{ '<|eot_id|>' }}"),
    ("chatml", "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'}}"),
    ("gemma", "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"),
    ("phi3", "{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}"),
    ("mistral", "{{ bos_token }}{% for m in messages %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endfor %}"),
    (None, "{{ '<|user|>\n' + message['content'] + eos_token }}"),  # zephyr: <|user|> without <|end|>
    (None, "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"),
])
def test_family_markers(family, jinja):
    assert family_of(jinja) == family


def test_templates_are_valid_modelfile_values():
    for spec in FAMILIES.values():
        assert quote(spec["template"]).startswith('"""')  # multi-line, and writable


def test_template_from_non_gguf(tmp_path):
    (tmp_path / "x.gguf").write_text("nope")
    with pytest.raises(InputError, match="is not a GGUF file"):
        template_from_gguf(tmp_path / "x.gguf")


# ---- the CLI command ----------------------------------------------------------------------------------------


def test_cli_modelfile_with_template_from(chatml_base, tmp_path):
    (tmp_path / "sql.gguf").write_bytes(b"GGUF")
    out = tmp_path / "Modelfile"
    result = runner.invoke(app, ["modelfile", "--from", "qwen2.5:0.5b", "--adapter", str(tmp_path / "sql.gguf"),
                                    "--system", "Answer in SQL.", "--template-from", str(chatml_base),
                                    "--param", "temperature=0", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote {out}\n  template: the GGUF's chat template is the chatml family\n"
    text = out.read_text()
    assert text.startswith("FROM qwen2.5:0.5b\nADAPTER ./sql.gguf\nTEMPLATE \"\"\"{{- if .System }}<|im_start|>")
    assert text.endswith('SYSTEM Answer in SQL.\nPARAMETER stop <|im_start|>\nPARAMETER stop <|im_end|>\n'
                         'PARAMETER stop </s>\nPARAMETER temperature 0\n')


def test_cli_modelfile_errors_are_one_line(tmp_path):
    out = tmp_path / "Modelfile"
    out.write_text("FROM keep\n")
    result = runner.invoke(app, ["modelfile", "--from", "m", "-o", str(out)])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith(f"error: Output {out} already exists.") and result.stderr.count("\n") == 1
    assert out.read_text() == "FROM keep\n"
    result = runner.invoke(app, ["modelfile", "--from", "m", "--system", 'x"""y', "-o", str(tmp_path / "M2")])
    assert result.exit_code == 1 and "cannot be written in a Modelfile" in result.stderr
    assert not (tmp_path / "M2").exists()
