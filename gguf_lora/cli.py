"""The `gguf-lora` command: a thin client of the library. Parses, calls, prints.

Exit codes: 0 ok; 1 an error, one line (what, why, what to do); 2 a command line the parser rejects (a missing
argument, an unknown option, `adapters use` with neither names nor --none), reported with the usage line."""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer

from .errors import GgufLoraError

# Plain (click) help and usage errors: typer's rich rendering imports rich and markdown-it and doubles the
# start-up of `--help` (issue 13: commands that touch no tensors start in <= 0.25 s).
PLAIN = None
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=PLAIN,
                  help="Turn PEFT LoRA adapters into files llama.cpp and Ollama serve, exactly.")


def _fail(e: GgufLoraError) -> None:
    if os.environ.get("GGUF_LORA_DEBUG"):
        raise e
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(1)


def _progress(enabled: bool, console=None):
    """A rich progress bar on stderr when it is a terminal (or on the given rich console), otherwise nothing.
    The library reports bytes of output written: the bar shows them with the throughput and the time left."""
    if not enabled or (console is None and not sys.stderr.isatty()):
        return None, None
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TextColumn("eta"), TimeRemainingColumn(), TextColumn("elapsed"), TimeElapsedColumn(),
                   console=console or Console(stderr=True), transient=True)
    task = bar.add_task("working", total=None)

    def update(done: int, total: int, name: str) -> None:
        bar.update(task, completed=done, total=total, description=name)

    return bar, update


@contextmanager
def _one_blas_thread() -> Iterator[None]:
    """gguf-lora spreads its work over its own threads; BLAS threads on top oversubscribe the cores and
    spin (a merge ran 40% slower). The tensor commands limit BLAS to one thread; the library leaves it
    alone. numpy is imported first: threadpoolctl only reaches libraries already loaded."""
    import numpy  # noqa: F401
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


@app.command()
def convert(
    adapter: Path = typer.Argument(..., help="PEFT adapter folder (adapter_config.json + weights)."),
    base: Optional[Path] = typer.Option(None, "--base", "-b",
                                        help="Base model: its GGUF file, or Hugging Face folder / config.json."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output .gguf (default: beside the adapter)."),
    outtype: str = typer.Option("f16", "--outtype", help="f32, f16, bf16 or q8_0 (q8_0 falls back to f16 per "
                                                          "tensor where rows are not multiples of 32)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
    text_only: bool = typer.Option(False, "--text-only", help="Convert the language part of a multimodal adapter; "
                                   "its vision / audio modules (which llama.cpp never adapts) are left out and listed."),
) -> None:
    """Convert a PEFT LoRA adapter into a GGUF LoRA for llama.cpp / llama-server / Ollama."""
    from functools import partial

    from .convert import convert as do_convert

    result = _run_with_progress(as_json, partial(do_convert, text_only=text_only), adapter, base, output, outtype,
                                force)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    ranks = ", ".join(map(str, result.ranks))
    typer.echo(f"wrote {result.output}: {result.arch} LoRA, {result.tensors} tensors, rank {ranks}, "
               f"alpha {result.alpha:g}, {result.outtype}, {result.bytes:,} bytes")
    if result.folded_scales:
        typer.echo(f"  PEFT scales folded into lora_b for {len(result.folded_scales)} modules "
                   "(rsLoRA / rank_pattern / alpha_pattern)")
    if not result.shapes_validated:
        typer.echo("  note: the base gave no tensor shapes (config.json only); shapes were not checked")
    _print_left_out(result.left_out)


def _print_left_out(left_out: list[str]) -> None:
    if left_out:
        typer.echo(f"  left out {len(left_out)} vision / audio modules (--text-only): {', '.join(left_out)}")


def _run_with_progress(as_json: bool, fn, *args):
    bar, update = _progress(not as_json)
    try:
        with _one_blas_thread(), _interruptible():
            if bar:
                with bar:
                    return fn(*args, progress=update)
            return fn(*args)
    except GgufLoraError as e:
        _fail(e)


@contextmanager
def _interruptible():
    """SIGTERM (systemd, `timeout`, CI cancellation) and SIGHUP (a closed terminal) stop a command exactly as
    Ctrl-C does: Interrupted is raised in the main thread, every cleanup runs (the temporary output file is
    removed), and the exit code is 128 + the signal number. A second signal during the cleanup is ignored,
    so the cleanup itself cannot be cut short."""
    import signal
    import threading

    from .errors import Interrupted

    caught: list[int] = []

    def handler(signum, frame):
        if not caught:
            caught.append(signum)
            raise Interrupted(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        typer.echo(f"error: Interrupted by {signal.Signals(signum).name}. Nothing was written (no partial file is "
                   "left); run the command again.", err=True)
        raise typer.Exit(128 + signum) from None
    finally:
        for sig, old_handler in previous.items():
            signal.signal(sig, old_handler)


def _print_merge(result, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    types = ", ".join(f"{n} {t}" for t, n in sorted(result.types.items(), key=lambda kv: -kv[1]))
    typer.echo(f"wrote {result.output}: {result.arch}, {result.tensors} tensors ({types}), "
               f"{result.merged_tensors} merged, {result.bytes:,} bytes")
    for a in result.adapters:
        typer.echo(f"  merged {a['adapter']} at scale {a['scale']:g} (sha256 {a['sha256'][:12]})")
    if result.fallbacks:  # llama-quantize warns "N of M tensor(s) required fallback quantization"
        fell = lambda key: ", ".join(map(str, sorted({f[key] for f in result.fallbacks})))  # noqa: E731
        typer.echo(f"  note: {len(result.fallbacks)} of {result.tensors} tensors fell back from {fell('wanted')} to "
                   f"{fell('got')}: their rows ({fell('columns')} values) are not a multiple of the type's block, "
                   "as llama-quantize does")
    _print_left_out(result.left_out)


@app.command()
def merge(
    adapters: list[str] = typer.Argument(..., help="PEFT folders or GGUF LoRAs, each optionally :SCALE."),
    base: Path = typer.Option(..., "--base", "-b", help="Base model GGUF (any type, quantized included)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .gguf."),
    outtype: str = typer.Option("same", "--outtype", help="same (keep each tensor's type), f32, f16, bf16, q8_0, "
                                                           "q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_s, q3_k_m, "
                                                           "q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k, "
                                                           "mxfp4_moe."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
    text_only: bool = typer.Option(False, "--text-only", help="Merge the language part of multimodal adapters; "
                                   "their vision / audio modules are left out and listed."),
) -> None:
    """Bake adapters into a base GGUF in one streaming pass, typed as llama-quantize would."""
    from functools import partial

    from .merge import merge as do_merge, parse_adapter_arg

    try:
        pairs = [parse_adapter_arg(a) for a in adapters]
    except GgufLoraError as e:
        _fail(e)
    _print_merge(_run_with_progress(as_json, partial(do_merge, text_only=text_only), base, pairs, output, outtype,
                                    force), as_json)


@app.command()
def quantize(
    source: Path = typer.Argument(..., help="Input GGUF model."),
    output: Path = typer.Argument(..., help="Output .gguf."),
    outtype: str = typer.Argument(..., help="f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_s, "
                                            "q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k or "
                                            "mxfp4_moe (experts MXFP4, the rest Q8_0)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
) -> None:
    """Re-type a GGUF model exactly as llama-quantize does (no imatrix)."""
    from .merge import quantize as do_quantize

    _print_merge(_run_with_progress(as_json, do_quantize, source, output, outtype, force), as_json)


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="A GGUF file (adapter or model) or a PEFT adapter folder."),
    base: Optional[Path] = typer.Option(None, "--base", "-b", help="Check whether the adapter fits this base."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Show an adapter or model: metadata, tensors, ranks, effective scales, and fit with --base."""
    from .inspect import inspect as do_inspect, render

    try:
        report = do_inspect(path, base)
    except GgufLoraError as e:
        _fail(e)
    typer.echo(json.dumps(report, indent=2) if as_json else render(report))
    if report.get("fits") is False:
        raise typer.Exit(1)


@app.command()
def verify(
    adapter: Path = typer.Argument(..., help="PEFT adapter folder: the reference, run by transformers + peft."),
    files: Optional[list[Path]] = typer.Argument(None, help="GGUF LoRA files (run on --base) and merged GGUFs to "
                                                            "check (default: convert the adapter and check that)."),
    base: Path = typer.Option(..., "--base", "-b", help="Base model GGUF (LoRA files run on it; the floor)."),
    hf_base: Optional[Path] = typer.Option(None, "--hf-base", help="Hugging Face base folder (default: the "
                                           "adapter's base_model_name_or_path when it is a local folder)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Text file (one user message per line) or "
                                           ".jsonl ({\"messages\": [...]} or {\"prompt\": TEXT}); default: 4 chat "
                                           "prompts."),
    tokens: int = typer.Option(32, "--tokens", "-n", help="Greedy tokens per prompt."),
    top_k: int = typer.Option(10, "--top-k", help="|Δ log-prob| over each step's top-k tokens."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, or auto (the checkpoint's own dtype)."),
    llama_server: Optional[Path] = typer.Option(None, "--llama-server", help="llama-server binary (default: the "
                                                "pinned build, $GGUF_LORA_LLAMA_CPP_BIN, PATH)."),
    server_args: str = typer.Option("", "--server-args", help="Extra llama-server arguments, e.g. '-t 8'."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Check that GGUF files answer like transformers + peft with the adapter; exit 1 unless all match."""
    import shlex

    from .verify import render_report, verify as do_verify

    say = None if as_json else (lambda msg: typer.echo(f"verify: {msg}", err=True))
    try:
        report = do_verify(adapter, base, files or [], hf_base=hf_base, prompts=prompts, tokens=tokens, top_k=top_k,
                           dtype=dtype, llama_server=llama_server, server_args=shlex.split(server_args),
                           progress=say)
    except GgufLoraError as e:
        _fail(e)
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else render_report(report))
    if not report.ok:
        raise typer.Exit(1)


DEFAULT_URL = "http://127.0.0.1:8080"


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             options_metavar="[OPTIONS] [-- LLAMA_SERVER_ARGS...]")
def serve(
    ctx: typer.Context,
    base: Path = typer.Option(..., "--base", "-b", help="Base model GGUF."),
    adapters: list[Path] = typer.Option([], "--adapters", "-a", help="A folder of GGUF LoRAs (each addressed by "
                                        "its file name) or one file; repeatable."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8080, "--port", help="Port to listen on."),
    use: list[str] = typer.Option([], "--use", help="NAME[=SCALE]: the global selection at start (default: none)."),
    unknown_model: str = typer.Option("error", "--unknown-model", help="What a request whose model names nothing "
                                      "served gets: error (a 404 listing the models) or selection (the adapters "
                                      "chosen with 'gguf-lora adapters use')."),
    watch: bool = typer.Option(True, "--watch/--no-watch", help="Restart llama-server (holding requests) when "
                               "adapter files are added to, changed in or removed from the folders."),
    llama_server: Optional[Path] = typer.Option(None, "--llama-server", help="llama-server binary (default: the "
                                                "pinned build, $GGUF_LORA_LLAMA_CPP_BIN, PATH)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="GGUF_LORA_API_KEY",
                                          help="Require this key from clients (Authorization: Bearer KEY)."),
    log: Optional[Path] = typer.Option(None, "--log", help="Write llama-server's log here (default: a temp file)."),
    ready_timeout: float = typer.Option(300.0, "--ready-timeout", help="Seconds to wait for the model to load."),
) -> None:
    """Serve a base and its adapters through an OpenAI-compatible API: the adapter is chosen by `model`.

    /v1/models lists the base and every adapter; model "sql" gets that adapter, the base's name the bare base,
    "sql@0.5+style" a mix. llama-server runs behind it on a private port, prompt cache on and exact.
    Arguments after the options (or after --) go to llama-server, e.g. -- -c 8192 -np 4 -ngl 99.
    """
    from .runtime.llama_server import parse_selection
    from .runtime.router import Router

    say = lambda msg: typer.echo(msg, err=True)  # noqa: E731
    try:
        router = Router(base, adapters, host=host, port=port, api_key=api_key, llama_server=llama_server,
                        extra_args=ctx.args, log=log, ready_timeout=ready_timeout, scales=parse_selection(use),
                        unknown_model=unknown_model, watch=1.0 if watch else None, notify=say)
    except GgufLoraError as e:
        _fail(e)

    def ready(r) -> None:
        active = ", ".join(f"{n}={s:g}" for n, s in r.selection.items() if s) or "none"
        typer.echo(f"serving at {r.url}: models {', '.join(r.model_ids())}; global selection: {active}")
        say(f"  llama-server's log: {r.backend.server.log}; Ctrl-C stops it" if log else
            "  Ctrl-C stops it (--log FILE keeps llama-server's log; without it the log is removed on stop)")

    try:
        router.run(ready, handle_signals=True)
    except GgufLoraError as e:
        _fail(e)
    except KeyboardInterrupt:
        pass
    say("stopped")


adapters_app = typer.Typer(no_args_is_help=True, rich_markup_mode=PLAIN,
                           help="List the adapters of a running server and set its global selection.")
app.add_typer(adapters_app, name="adapters")
URL_OPTION = typer.Option(DEFAULT_URL, "--url", envvar="GGUF_LORA_URL",
                          help="The server to talk to (gguf-lora serve, or llama-server).")
KEY_OPTION = typer.Option(None, "--api-key", envvar="GGUF_LORA_API_KEY", help="The server's API key.")


def _print_adapters(adapters, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps([a.to_dict() for a in adapters], indent=2))
        return
    if not adapters:
        typer.echo("no adapters loaded")
    for a in adapters:
        typer.echo(f"{'*' if a.scale else ' '} {a.name:<24} scale {a.scale:<6g} id {a.id}  {a.path}")


@adapters_app.command("list")
def adapters_list(url: str = URL_OPTION, api_key: Optional[str] = KEY_OPTION,
                  as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout.")) -> None:
    """Show the server's adapters and their global scales (* = active)."""
    from .runtime.llama_server import LlamaServer

    try:
        _print_adapters(LlamaServer(url, api_key, timeout=30).adapters(), as_json)
    except GgufLoraError as e:
        _fail(e)


@adapters_app.command("use")
def adapters_use(
    names: list[str] = typer.Argument(None, help="NAME or NAME=SCALE; every adapter not named goes to 0."),
    none: bool = typer.Option(False, "--none", help="Switch every adapter off (the bare base)."),
    url: str = URL_OPTION, api_key: Optional[str] = KEY_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Set the global selection: what requests whose model names nothing get under serve --unknown-model selection."""
    from .runtime.llama_server import LlamaServer, parse_selection

    if bool(names) == none:  # a usage error: exit 2 with the usage line, as the parser reports its own
        raise typer.BadParameter("name the adapters to use, or pass --none for the bare base",
                                 param_hint="NAMES / --none")
    try:
        _print_adapters(LlamaServer(url, api_key, timeout=30).use(parse_selection(names or [])), as_json)
    except GgufLoraError as e:
        _fail(e)


ollama_app = typer.Typer(no_args_is_help=True, rich_markup_mode=PLAIN,
                         help="Deploy adapters to an Ollama server and prove that it applies them.")


@ollama_app.callback()
def _group() -> None:
    """Deploy adapters to an Ollama server and prove that it applies them."""


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
        # a merged deploy merges here; its temporary folder (a converted or merged model) is removed on any signal
        with _one_blas_thread(), _interruptible():
            result = do_deploy(adapter, base, name, client=Ollama(url), scale=scale, outtype=outtype.lower(),
                               prompts=prompts, store=store, progress=say, merged=merge)
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


@app.command()
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
        with _interruptible():
            out = write_modelfile(output, text, force)
    except GgufLoraError as e:
        _fail(e)
    typer.echo(f"wrote {out}")
    if note:
        typer.echo(f"  template: {note}")
app.add_typer(ollama_app, name="ollama")


def main() -> None:
    # A path typed with bytes that are not UTF-8 reaches Python as lone surrogates; print such names back as
    # the bytes they were (as ls does), whatever the locale's error handler, instead of failing to print them.
    for stream, errors in ((sys.stdout, "surrogateescape"), (sys.stderr, "backslashreplace")):
        try:
            stream.reconfigure(errors=errors)
        except (AttributeError, ValueError):
            pass
    try:
        app()
    except Exception as e:  # a bug, not bad input (those are GgufLoraErrors): still one line, no traceback
        if os.environ.get("GGUF_LORA_DEBUG"):
            raise
        from .errors import one_line

        typer.echo(f"error: internal error ({one_line(f'{type(e).__name__}: {e}')}). This is a bug in gguf-lora; "
                   "run again with GGUF_LORA_DEBUG=1 and report the traceback.", err=True)
        sys.exit(1)
