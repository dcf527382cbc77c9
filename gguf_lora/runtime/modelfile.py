"""Ollama Modelfiles: written so that Ollama's parser reads back exactly the values given, and a chat
TEMPLATE + stop words derived from a base GGUF's own chat template.

The Modelfile syntax has no escapes: a value is written plain, or inside \"\"\"...\"\"\" when it has a newline,
edge spaces or a quote. A value containing \"\"\" (or ending in ", which would merge with the closing quotes)
cannot be written at all, so it is refused rather than silently cut.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..output import atomic_output, check_output

# Ollama Go templates for the chat-template families seen in the field, kept as data. A family is recognised
# by a marker in the GGUF's Jinja tokenizer.chat_template; the stop words end a turn in that family.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama3": {
        "markers": ["<|start_header_id|>"],
        "stop": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "template": (
            "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>\n{{- end }}\n"
            "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n"
            "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"),
    },
    "chatml": {
        "markers": ["<|im_start|>"],
        "stop": ["<|im_start|>", "<|im_end|>"],
        "template": (
            "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}\n"
            "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"),
    },
    "gemma": {
        "markers": ["<start_of_turn>"],
        "stop": ["<start_of_turn>", "<end_of_turn>"],
        "template": (
            "{{- range $i, $_ := .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}user"
            "{{ end }}\n{{ if and (eq $i 0) $.System }}{{ $.System }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n"
            "{{ end }}<start_of_turn>model\n"),
    },
    "phi3": {
        "markers": ["<|user|>", "<|end|>"],  # both: <|user|> alone is also zephyr's
        "stop": ["<|end|>", "<|user|>", "<|assistant|>"],
        "template": (
            "{{- if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}\n"
            "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n"),
    },
    "mistral": {
        "markers": ["[INST]"],
        "stop": ["[INST]", "[/INST]"],
        "template": (
            "{{- range $i, $_ := .Messages }}\n{{- if eq .Role \"user\" }}[INST] "
            "{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}\n\n{{ end }}{{ .Content }}[/INST]\n"
            "{{- else if eq .Role \"assistant\" }} {{ .Content }}</s>\n{{- end }}\n{{- end }}"),
    },
}

MESSAGE_ROLES = ("system", "user", "assistant", "tool")


def quote(value: str, what: str = "value") -> str:
    """A Modelfile value as Ollama's parser will read it back unchanged; refuse what cannot be written."""
    value = str(value)
    if value and "\n" not in value and value == value.strip() and '"' not in value:
        return value
    if '"""' in value or value.endswith('"'):
        raise InputError(f"The {what} {value[:40]!r} cannot be written in a Modelfile",
                         'it contains """ or ends in ", and Modelfiles have no escapes for quotes',
                         "change the text, or pass it through Ollama's JSON API (gguf-lora ollama deploy) instead")
    return f'"""{value}"""'


def _path_or_name(value: str | Path, folder: Path | None) -> str:
    """Files as ./relative paths when inside the Modelfile's folder (Ollama resolves them there), else absolute;
    anything that is not an existing file is an Ollama model name and stays as it is."""
    try:
        p = Path(value).expanduser()
        is_file = p.is_file()
    except (OSError, RuntimeError, ValueError):  # ~unknown-user, a name too long to be a path: an Ollama name
        p, is_file = Path(value), False
    if not (isinstance(value, Path) or is_file or str(value).endswith(".gguf")):
        return str(value)
    p = p.resolve()
    if folder is not None:
        folder = Path(folder).resolve()
        if folder in p.parents:
            return "./" + p.relative_to(folder).as_posix()
    return str(p)


def modelfile(from_: str | Path, adapter: str | Path | None = None, template: str | None = None,
              system: str | None = None, parameters: dict[str, Any] | None = None,
              messages: Iterable[dict] | None = None, license: str | None = None, *,
              folder: str | Path | None = None) -> str:
    """The text of a Modelfile. `folder` is where it will be written: files under it become ./relative paths."""
    folder = Path(folder) if folder is not None else None
    lines = [f"FROM {quote(_path_or_name(from_, folder), 'FROM path or name')}"]
    if adapter is not None:
        lines.append(f"ADAPTER {quote(_path_or_name(Path(adapter), folder), 'ADAPTER path')}")
    if template is not None:
        lines.append(f"TEMPLATE {quote(template, 'template')}")
    if system is not None:
        lines.append(f"SYSTEM {quote(system, 'system message')}")
    for key, value in (parameters or {}).items():
        if not key or not key.replace("_", "").isalnum():
            raise InputError(f"Parameter name {key!r} is not valid", "Ollama parameter names are words like "
                             "temperature, num_ctx or stop", "use key=value with a plain name")
        for v in value if isinstance(value, (list, tuple)) else [value]:
            text = str(v).lower() if isinstance(v, bool) else str(v)
            lines.append(f"PARAMETER {key} {quote(text, f'parameter {key}')}")
    for m in messages or []:
        role = m.get("role")
        if role not in MESSAGE_ROLES:
            raise InputError(f"Message role {role!r} is not valid", f"Ollama accepts {', '.join(MESSAGE_ROLES)}",
                             "fix the message's role")
        lines.append(f"MESSAGE {role} {quote(m.get('content', ''), 'message')}")
    if license is not None:
        lines.append(f"LICENSE {quote(license, 'license')}")
    return "\n".join(lines) + "\n"


def write_modelfile(path: str | Path, text: str, force: bool = False) -> Path:
    """Write a Modelfile atomically: complete or not at all; an existing file only with force."""
    out = check_output(Path(path), force, [])
    with atomic_output(out) as tmp:  # a name typed with non-UTF-8 bytes is written back as those bytes
        tmp.write_bytes(text.encode("utf-8", "surrogateescape" if _escaped_only(text) else "replace"))
    return out


def _escaped_only(text: str) -> bool:
    """True when every lone surrogate in text is a byte Python escaped from a command line (U+DC80..U+DCFF)."""
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


def parse_param(arg: str) -> tuple[str, Any]:
    """k=v from the command line; numbers become numbers (Ollama's JSON API wants them typed)."""
    key, sep, value = arg.partition("=")
    if not sep or not key.strip():
        raise InputError(f"Parameter {arg!r} is not key=value", "", "write it like --param temperature=0.7")
    for cast in (int, float):
        try:
            return key.strip(), cast(value)
        except ValueError:
            pass
    return key.strip(), {"true": True, "false": False}.get(value.lower(), value)


def group_params(pairs: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Repeated keys accumulate into a list (PARAMETER stop a / PARAMETER stop b); stop is always a list."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out or k == "stop":
            prev = out.get(k, [])
            out[k] = (prev if isinstance(prev, list) else [prev]) + [v]
        else:
            out[k] = v
    return out


@dataclass
class ChatTemplate:
    """What a base GGUF says about chatting: the Ollama TEMPLATE (None when unknown) and stop words."""

    family: str | None
    template: str | None
    stop: list[str] = field(default_factory=list)
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def family_of(chat_template: str) -> str | None:
    for name, spec in FAMILIES.items():
        if all(m in chat_template for m in spec["markers"]):
            return name
    return None


def template_from_gguf(path: str | Path) -> ChatTemplate:
    """Map the GGUF's tokenizer.chat_template to a known family's Ollama template; stop words from the family
    and from the file's own end tokens (eos, eot, eom)."""
    from ..base import is_gguf
    from ..gguf_read import GGUFFile
    from ..validate import usable_path

    path = usable_path(path)
    if not path.is_file() or not is_gguf(path):
        raise InputError(f"{path} is not a GGUF file", "a chat template is read from a GGUF model's metadata",
                         "pass the base model's .gguf")
    reader = GGUFFile(path)  # truncated or damaged: a GGUFError naming the file; values are type-checked
    tokens = reader.get("tokenizer.ggml.tokens", "strs", [])
    stop: list[str] = []
    jinja = reader.get("tokenizer.chat_template", "str", None)
    family = family_of(jinja) if isinstance(jinja, str) else None
    if family:
        stop += FAMILIES[family]["stop"]
    for key in ("eos", "eot", "eom"):
        tid = reader.get(f"tokenizer.ggml.{key}_token_id", "int", None)
        if isinstance(tid, int) and 0 <= tid < len(tokens) and tokens[tid] not in stop:
            stop.append(tokens[tid])
    if family:
        return ChatTemplate(family, FAMILIES[family]["template"], stop,
                            f"the GGUF's chat template is the {family} family")
    if not isinstance(jinja, str):
        return ChatTemplate(None, None, stop, "the GGUF has no tokenizer.chat_template, so no TEMPLATE is written")
    return ChatTemplate(None, None, stop, "the GGUF's chat template is not one of the known families ("
                        + ", ".join(FAMILIES) + "), so no TEMPLATE is written; add one with --template")
