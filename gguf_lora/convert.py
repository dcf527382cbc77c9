"""PEFT adapter -> GGUF LoRA file that llama.cpp, llama-server and Ollama load.

The runtime multiplies each pair by user_scale * alpha / rank (llama-adapter.cpp), with one alpha per file
and the rank read from that tensor's lora_b. PEFT's own scale (rsLoRA, rank/alpha patterns) is folded into
lora_b wherever it differs, so the product equals PEFT's for every module.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from . import __version__
from . import typerules
from .errors import InputError
from .mapping import PlannedPair, pair_arrays, plan, resolve_base, target_shape, text_part, transform_rows  # noqa: F401
from .output import TensorSpec, atomic_output, check_output, utf8_text, write_gguf
from .quants import encode
from .peft import load_adapter

# the types an adapter file may use: typerules' table, restricted
OUTTYPES = {name: typerules.OUTTYPES[name][1] for name in ("f32", "f16", "bf16", "q8_0")}

Progress = Callable[[int, int, str], None]  # (bytes of output written, of total, the tensor just written)


@dataclass
class ConvertResult:
    output: str
    arch: str
    tensors: int
    ranks: list[int]
    alpha: float
    bytes: int
    outtype: str
    base: str
    shapes_validated: bool
    folded_scales: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # vision / audio modules skipped (text_only)

    def to_dict(self) -> dict:
        return asdict(self)


def tensor_type(shape: tuple[int, ...], outtype: str) -> gguf.GGMLQuantizationType:
    """The requested type, or F16 where Q8_0 cannot hold the rows (as llama.cpp's converter falls back)."""
    qtype = OUTTYPES[outtype]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def convert(adapter: str | Path, base: str | Path | None = None, output: str | Path | None = None,
            outtype: str = "f16", force: bool = False, progress: Progress | None = None,
            text_only: bool = False) -> ConvertResult:
    """Convert a PEFT LoRA folder into a GGUF LoRA for `base`; returns what was written.

    text_only: convert the language part of a multimodal adapter and list the vision / audio / projector modules
    left out (llama.cpp applies no LoRA there); without it such an adapter is refused."""
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise InputError(f"Unknown output type {outtype!r}", "", f"choose one of {', '.join(OUTTYPES)}")
    peft, left_out = text_part(load_adapter(adapter)) if text_only else (load_adapter(adapter), [])
    model = resolve_base(peft, base)
    alpha, planned = plan(peft, model)
    out = Path(output) if output else peft.path.parent / f"{peft.path.name}-lora-{outtype}.gguf"
    inputs = [peft.path, peft.weights_file, model.source]
    check_output(out, force, inputs)

    specs = [TensorSpec(p.gguf_name + suffix, shape, tensor_type(shape, outtype))
             for p in planned for suffix, shape in ((".lora_a", p.a_shape), (".lora_b", p.b_shape))]

    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(utf8_text(peft.name))
        tokens = peft.config.get("alora_invocation_tokens")
        if tokens:
            writer.add_key_value(gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS, [int(t) for t in tokens],
                                 gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32)
        writer.add_string("gguf_lora.version", __version__)
        writer.add_string("gguf_lora.source", utf8_text(peft.name))
        writer.add_string("gguf_lora.source_sha256", peft.content_hash())
        # PEFT's scale of each pair, already folded into lora_b: what 'gguf-lora inspect' shows (NaN where the
        # pair joins modules of different scales, e.g. q, k and v in a fused attn_qkv: each block has its own)
        writer.add_array("gguf_lora.peft_scale_tensors", [p.gguf_name for p in planned])
        writer.add_array("gguf_lora.peft_scales", [float(p.pair.scale) if len({part.pair.scale for part in p.parts}) == 1
                                                   else float("nan") for p in planned])

    arrays: dict[int, np.ndarray] = {}

    def produce(i: int) -> np.ndarray:
        if i % 2 == 0:
            arrays[0], arrays[1] = pair_arrays(peft, planned[i // 2], model, runtime=True)
        return encode(arrays.pop(i % 2), specs[i].qtype)

    with atomic_output(out) as tmp:
        write_gguf(tmp, model.arch.name, metadata, specs, produce, progress)
    return ConvertResult(
        output=str(out.resolve()), arch=model.arch.name, tensors=2 * len(planned),
        ranks=sorted({p.rank for p in planned}), alpha=alpha, bytes=out.stat().st_size, outtype=outtype,
        base=str(Path(model.source).resolve()), shapes_validated=model.validates_shapes,
        folded_scales=sorted({part.pair.module for p in planned for part in p.parts if part.fold != 1.0}),
        left_out=left_out)
