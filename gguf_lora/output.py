"""Outputs are written to a temporary file in the target folder and renamed at the end: a failure or an
interruption leaves nothing behind, and an existing file is replaced only once the new one is complete."""
from __future__ import annotations

import errno
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from .errors import OutputError

if TYPE_CHECKING:  # imported where used: `gguf-lora modelfile` writes through this module without them
    import gguf
    import numpy as np


def check_output(out: Path, force: bool, inputs: Iterable[Path]) -> Path:
    """Refuse before any work: an input as output, a missing folder, an existing file without --force."""
    out = Path(out)
    resolved = out.resolve()
    for p in inputs:
        p = Path(p).resolve()
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


@contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """Yield a temporary path beside `out`; rename it to `out` only if the block completes."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual mode
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, out)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, None):  # None: a short write (numpy's tofile)
            raise OutputError(f"Writing {out} failed: {os.strerror(e.errno) if e.errno else e}", "the disk or the file size limit is full",
                              "free space in that folder (nothing was written) and run again") from None
        raise OutputError(f"Writing {out} failed: {e}", "nothing was written", "check the folder's permissions") from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


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
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gguf-lora-produce") as ahead:
            pending = ahead.submit(produce, 0) if specs else None
            for i, spec in enumerate(specs):
                data = pending.result()  # tensor i; tensor i+1 is computed while this one is written
                pending = ahead.submit(produce, i + 1) if i + 1 < len(specs) else None
                data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
                writer.write_tensor_data(data)
                written += padded(data.nbytes)
                del data
                if progress:
                    progress(written, expected, spec.name)
        writer.close()
        expect_size(path, expected)
    except BaseException:
        for f in writer.fout or []:
            f.close()
        raise
