"""Outputs are written to a temporary file in the target folder and renamed at the end: a failure or an
interruption leaves nothing behind, and an existing file is replaced only once the new one is complete."""
from __future__ import annotations

import errno
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from .errors import OutputError, ValueRangeError
from .validate import usable_path

if TYPE_CHECKING:  # imported where used: `gguf-lora modelfile` writes through this module without them
    import gguf
    import numpy as np

    from .finite import TypeOverflow


def check_output(out: Path, force: bool, inputs: Iterable[Path]) -> Path:
    """Refuse before any work: an input as output, a missing folder, an existing file without --force."""
    out = usable_path(out, "Output ")
    resolved = out.resolve()
    for p in inputs:
        p = usable_path(p).resolve()
        if resolved == p or (p.is_dir() and p in resolved.parents and resolved.name in
                             {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"}):
            raise OutputError(f"Output {out} is one of the inputs", "gguf-lora never overwrites its inputs",
                              "choose another output path with -o")
    if not resolved.parent.is_dir():
        raise OutputError(f"Output folder {out.parent} does not exist", "", f"create it first: mkdir -p {out.parent}")
    if out.is_dir():
        raise OutputError(f"Output {out} is a folder", "", "pass a file path ending in .gguf with -o")
    if out.exists() and not force:
        raise OutputError(f"Output {out} already exists", "it is kept unless you ask", "pass --force to replace it")
    return out


_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, None)  # None: a short write (numpy's tofile)


@contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """Yield a temporary path beside `out`; rename it to `out` only if the block completes.

    The temporary file is created inside the guard, so every way out (an error, Ctrl-C, SIGTERM and SIGHUP
    through the CLI's handlers, a full disk, a read-only folder) removes it. Its name is random: it is
    created exclusively (never someone else's file), with the usual mode for new files (umask applies)."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(6)}.partial"
    created = False
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666))
        created = True
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as e:
        if created:
            _remove(tmp)
        if e.errno in _FULL:
            raise OutputError(f"Writing {out} failed: {os.strerror(e.errno) if e.errno else e}",
                              "the disk or the file size limit is full",
                              "free space in that folder (nothing was written) and run again") from None
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise OutputError(f"Cannot write in {out.parent} ({os.strerror(e.errno)})", "nothing was written",
                              "choose a writable folder with -o, or check the folder's permissions") from None
        raise OutputError(f"Writing {out} failed: {e.strerror or e}", "nothing was written",
                          "check the folder's permissions and free space") from None
    except BaseException:
        _remove(tmp)  # before the exception goes on: an interruption leaves nothing behind
        raise


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # the folder became unwritable: nothing more can be done, and the first error matters more


def utf8_text(text: str) -> str:
    """Text that can be written as UTF-8. A path typed with bytes that are not UTF-8 reaches Python as lone
    surrogates (\udcff), which no UTF-8 writer accepts; they are written as U+FFFD."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate from elsewhere (JSON "\ud800")
        raw = text.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace")


def expect_size(path: Path, expected: int) -> None:
    """Catch writes that failed silently: numpy's tofile can lose a buffered write error (e.g. disk full)."""
    size = path.stat().st_size
    if size != expected:
        raise OSError(errno.ENOSPC if size < expected else errno.EIO,
                      f"{path} has {size} bytes where {expected} were written")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # numpy order, rows first
    qtype: gguf.GGMLQuantizationType


def write_gguf(path: Path, arch: str, metadata: Callable[[gguf.GGUFWriter], None], specs: list[TensorSpec],
               produce: Callable[[int], np.ndarray], progress: Callable[[int, int, str], None] | None = None) -> None:
    """Stream a GGUF: header and tensor table first, then one tensor at a time from produce(i), which
    returns that tensor's bytes (any array of the right size). The next tensor is produced while the
    current one is written: peak memory is two tensors, not a model. progress(done, total, name) follows
    the bytes of the file written (a throughput and a time left can be derived from them)."""
    import gguf
    import numpy as np

    from .finite import TypeOverflow

    writer = gguf.GGUFWriter(path, arch, use_temp_file=False)
    try:
        metadata(writer)
        for spec in specs:
            shape = gguf.quants.quant_shape_to_byte_shape(spec.shape, spec.qtype)
            writer.add_tensor_info(spec.name, shape, np.dtype(np.uint8), int(np.prod(shape)), raw_dtype=spec.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.fout[0].flush()
        align = writer.data_alignment
        padded = lambda n: -(-n // align) * align  # noqa: E731
        written = padded(writer.fout[0].tell())
        expected = written + sum(padded(t.nbytes) for t in writer.tensors[0].values())
        ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gguf-lora-produce")
        try:
            pending = ahead.submit(produce, 0) if specs else None
            for i, spec in enumerate(specs):
                try:
                    data = pending.result()  # tensor i; tensor i+1 is computed while this one is written
                except TypeOverflow as e:
                    raise value_range_error(spec.name, e) from None
                pending = ahead.submit(produce, i + 1) if i + 1 < len(specs) else None
                data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
                writer.write_tensor_data(data)
                written += padded(data.nbytes)
                del data
                if progress:
                    progress(written, expected, spec.name)
        except BaseException:
            ahead.shutdown(wait=False, cancel_futures=True)  # do not wait for the tensor ahead: clean up now
            raise
        ahead.shutdown()
        writer.close()
        expect_size(path, expected)
    except BaseException:
        for f in writer.fout or []:
            f.close()
        raise


def value_range_error(name: str, e: TypeOverflow) -> ValueRangeError:
    """The tensor, its values and the type that cannot hold them, and what to do."""
    import gguf

    from .finite import LARGEST

    kind = e.qtype.name
    if not e.finite_input:
        return ValueRangeError(f"Tensor {name} holds NaN or Inf values before it is written as {kind}",
                               "a base weight, an adapter weight or a scale is not finite (or overflowed float32)",
                               "check the inputs, and use smaller adapter scales")
    if e.qtype in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16, gguf.GGMLQuantizationType.F32):
        holds = f"{kind} holds at most ±{LARGEST[e.qtype]:g}"
    else:
        holds = f"{kind} stores its block scales as F16 (at most ±65504), and these blocks need larger ones"
    return ValueRangeError(f"Tensor {name} has values from {e.lo:.4g} to {e.hi:.4g}, which {kind} cannot hold",
                           f"{holds}; the file would hold Inf", "write it as f32 (--outtype f32), or use a "
                           "smaller adapter scale (ADAPTER:0.5)")
