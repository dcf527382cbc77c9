"""The Ollama commands of `gguf-lora`: `ollama deploy` and `modelfile`. A thin client of gguf_lora.runtime.

cli.py adds them with `register(app)`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .errors import GgufLoraError

ollama_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help="Deploy adapters to an Ollama server and prove that it applies them.")


@ollama_app.callback()
def _group() -> None:
    """Deploy adapters to an Ollama server and prove that it applies them."""


def _fail(e: GgufLoraError) -> None:
    from .cli import _fail as fail

    fail(e)


@ollama_app.command()
def deploy(
    adapter: Path = typer.Argument(..., help="PEFT adapter folder or GGUF LoRA file."),
    base: str = typer.Option(..., "--base", "-b", help="Base: an Ollama model name (found in the local store) "
                                                      "or a base .gguf path."),
    name: str = typer.Option(..., "--name", "-n", help="Name of the new Ollama model, e.g. tiny-sql:latest."),
    url: Optional[str] = typer.Option(None, "--url", help="Ollama server (default: $OLLAMA_HOST or "
                                                         "http://127.0.0.1:11434)."),
    scale: float = typer.Option(1.0, "--scale", help="Adapter scale; other than 1 means a merged deploy "
                                                     "(Ollama applies adapters at 1.0)."),
    outtype: str = typer.Option("same", "--outtype", help="Tensor types of a merged model (see 'gguf-lora merge')."),
    merge: bool = typer.Option(False, "--merge", help="Always bake the adapter into the weights."),
    prompts: Optional[list[str]] = typer.Option(None, "--prompt", "-p", help="A prompt for the post-deploy check "
                                                                             "(repeatable)."),
    store: Optional[Path] = typer.Option(None, "--store", help="Ollama's model folder (default: $OLLAMA_MODELS or "
                                                               "~/.ollama/models)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Create an Ollama model from a base and an adapter, then check that its answers differ from the base."""
    from .runtime.ollama import AdapterIgnoredError, Ollama, deploy as do_deploy

    say = None if as_json else (lambda msg: typer.echo(msg, err=True))
    try:
        result = do_deploy(adapter, base, name, client=Ollama(url), scale=scale, outtype=outtype, prompts=prompts,
                           store=store, progress=say, merged=merge)
    except AdapterIgnoredError as e:
        if as_json and e.result is not None:
            typer.echo(json.dumps({**e.result.to_dict(), "error": str(e)}, indent=2))
        _fail(e)
    except GgufLoraError as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    typer.echo(f"created {result.name} on Ollama {result.version}: {result.path} path ({result.reason})")
    typer.echo(f"  check: {result.differs} of {len(result.check)} prompts answer differently from "
               f"{result.check_model}; the adapter is applied")


def modelfile(
    from_: str = typer.Option(..., "--from", help="Base: an Ollama model name or a .gguf path."),
    output: Path = typer.Option(..., "-o", "--output", help="The Modelfile to write."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="GGUF LoRA file for ADAPTER."),
    system: Optional[str] = typer.Option(None, "--system", help="SYSTEM message."),
    template: Optional[str] = typer.Option(None, "--template", help="TEMPLATE text (Go template)."),
    template_from: Optional[Path] = typer.Option(None, "--template-from", help="Derive TEMPLATE and stop words "
                                                                               "from this base GGUF's chat template."),
    params: Optional[list[str]] = typer.Option(None, "--param", help="PARAMETER as key=value (repeatable)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing Modelfile."),
) -> None:
    """Write an Ollama Modelfile (values quoted so Ollama reads them back unchanged)."""
    from .runtime.modelfile import group_params, modelfile as make, parse_param, template_from_gguf, write_modelfile

    try:
        parameters = group_params(parse_param(p) for p in params or [])
        note = None
        if template_from is not None:
            derived = template_from_gguf(template_from)
            note = derived.reason
            if template is None and derived.template:
                template = derived.template
            if derived.stop and "stop" not in parameters:
                parameters = {"stop": derived.stop, **parameters}
        text = make(from_, adapter, template=template, system=system, parameters=parameters or None,
                    folder=output.resolve().parent)
        out = write_modelfile(output, text, force)
    except GgufLoraError as e:
        _fail(e)
    typer.echo(f"wrote {out}")
    if note:
        typer.echo(f"  template: {note}")


def register(app: typer.Typer) -> None:
    """Add `ollama deploy` (a sub-command group) and `modelfile` to the gguf-lora app."""
    app.add_typer(ollama_app, name="ollama")
    app.command("modelfile")(modelfile)
