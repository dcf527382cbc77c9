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
from .archs import permute_rows
from .base import BaseModel, load_base
from .errors import AdapterError, BaseMismatchError, GgufLoraError, InputError, UnsupportedError
from .output import TensorSpec, atomic_output, check_output, utf8_text, write_gguf
from .quants import encode
from .peft import LoraPair, PeftAdapter, load_adapter

# the types an adapter file may use: typerules' table, restricted
OUTTYPES = {name: typerules.OUTTYPES[name][1] for name in ("f32", "f16", "bf16", "q8_0")}

Progress = Callable[[int, int, str], None]


@dataclass
class PlannedPair:
    """One module's journey: where it lands in GGUF, which transforms apply, and the factor folded into B."""

    pair: LoraPair
    gguf_name: str  # base tensor name, e.g. blk.0.attn_q.weight
    transforms: tuple[str, ...]
    fold: float  # lora_b *= fold, so that alpha_file / rank * fold == PEFT's scale
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]


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

    def to_dict(self) -> dict:
        return asdict(self)


def _unsupported_message(adapter: PeftAdapter) -> None:
    features = adapter.unsupported_features()
    if features:
        feature, names = features[0]
        more = f" (also: {', '.join(f for f, _ in features[1:])})" if len(features) > 1 else ""
        raise UnsupportedError(f"Adapter {adapter.path} has {feature}, e.g. {names[0]}{more}",
                               "a GGUF LoRA file carries only low-rank pairs, so llama.cpp cannot apply this",
                               "bake it into the model with 'gguf-lora merge' instead")


def _local(hint: str | None) -> Path | None:
    """The config's base_model_name_or_path when it is an existing local path (else a hub id, or nonsense)."""
    try:
        p = Path(hint).expanduser() if hint else None
        return p if p is not None and p.exists() else None
    except (OSError, RuntimeError, ValueError):  # too long to be a path, ~unknown-user, a NUL byte
        return None


def resolve_base(adapter: PeftAdapter, base: str | Path | None) -> BaseModel:
    hint = adapter.config.get("base_model_name_or_path")
    if base is not None:
        model = load_base(base)
        recorded = _local(hint)
        if recorded and Path(base).resolve() != recorded.resolve():
            try:
                trained_on = load_base(recorded).arch.name
            except GgufLoraError:
                trained_on = None  # unreadable or unsupported: the pair checks still apply
            if trained_on and trained_on != model.arch.name:
                raise BaseMismatchError(f"Adapter {adapter.path} was trained on {hint} ({trained_on}) but base "
                                        f"{base} is {model.arch.name}", "llama.cpp refuses a LoRA of another "
                                        "architecture, and the numbers would be meaningless anyway",
                                        "pass the adapter's own base model")
        return model
    if _local(hint):
        return load_base(_local(hint))
    said = f" (its base_model_name_or_path {hint!r} is not a local folder)" if hint else ""
    raise InputError(f"No base model for {adapter.path}{said}",
                     "the base tells the architecture, the q/k layout and every shape to check",
                     "pass --base BASE.gguf (the model you run) or --base HF_MODEL_FOLDER")


def target_shape(name: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> tuple[int, int]:
    """The base tensor shape a pair in llama.cpp's layout fits (token_embd's pair is stored flipped)."""
    return (a_shape[0], b_shape[0]) if name == "token_embd.weight" else (b_shape[0], a_shape[1])


def plan(adapter: PeftAdapter, base: BaseModel, merging: bool = False) -> tuple[float, list[PlannedPair]]:
    """Validate every pair against the base and decide names, transforms and the file alpha.

    merging: the pairs are baked into the weights, so a tied base is no obstacle where the architecture
    has a slot for a separate output tensor (an lm_head pair then lands on a new output.weight)."""
    if not merging:
        _unsupported_message(adapter)
    arch = base.arch
    name_map = arch.name_map(base.n_layers)
    alpha = float(adapter.config["lora_alpha"])
    planned: list[PlannedPair] = []
    for pair in adapter.pairs.values():
        module = arch.normalize_module(pair.module)
        leaf = module.rsplit(".", 1)[-1]
        gguf_name = name_map.get_name(module + ".weight", try_suffixes=(".weight",))
        untie = merging and arch.output_slot
        if leaf == "lm_head" and untie:
            gguf_name = "output.weight"
        if base.tied_embeddings and not untie and (leaf == "lm_head" or
                                                   gguf_name in ("output.weight", "token_embd.weight")):
            if merging:
                raise UnsupportedError(f"Adapter trains {pair.module}, and {arch.name} always ties its output "
                                       "projection to token_embd in llama.cpp", "PEFT changes only one of them, so "
                                       "no merged file can behave the same", "retrain without embed_tokens / lm_head")
            raise UnsupportedError(f"Adapter trains {pair.module}, and base {base.source} ties its output projection "
                                   "to token_embd", "llama.cpp would apply an embedding or lm_head LoRA to both "
                                   "(llama-server aborts on such a file) while PEFT changes only one",
                                   "bake it in with 'gguf-lora merge' instead")
        if leaf not in arch.lora_targets:
            raise UnsupportedError(
                f"Adapter targets {pair.module}, which gguf-lora cannot convert for {arch.name}",
                f"only {', '.join(sorted(arch.lora_targets))} map onto one GGUF tensor without an unimplemented "
                "transform (fused or stacked tensors)", "retrain without that target, or use 'gguf-lora merge'")
        if gguf_name is None:
            raise BaseMismatchError(f"Adapter targets {pair.module}, which has no tensor in a {arch.name} model",
                                    "the adapter was trained on another architecture", "pass the adapter's own base")
        if pair.embedding != (gguf_name == "token_embd.weight"):
            raise AdapterError(f"Module {pair.module} has {'embedding' if pair.embedding else 'linear'} LoRA weights "
                               f"but maps to {gguf_name}", "the adapter does not fit this architecture",
                               "pass the adapter's own base")
        transforms = arch.transforms.get(leaf, ())
        a_shape, b_shape = pair.a_shape, pair.b_shape
        if pair.embedding:
            a_shape = (a_shape[1], a_shape[0])  # llama.cpp reads token_embd.lora_a as (vocab, r)
        if base.tensors is not None:
            if gguf_name == "output.weight" and base.tied_embeddings and untie:
                want = base.tensors["token_embd.weight"]
            elif gguf_name not in base.tensors:
                raise BaseMismatchError(f"Adapter targets {pair.module} ({gguf_name}), which base {base.source} "
                                        "does not have", "the adapter was trained on another model",
                                        "pass the adapter's own base")
            else:
                want = base.tensors[gguf_name]
            if pair.embedding and "trim_vocab" in transforms and a_shape[0] > want[0]:
                a_shape = (want[0], a_shape[1])
            got = target_shape(gguf_name, a_shape, b_shape)
            if tuple(want) != got:
                raise BaseMismatchError(f"Adapter module {pair.module} has shape {got} but base tensor {gguf_name} "
                                        f"is {tuple(want)}", "the adapter was trained on another model size",
                                        "pass the adapter's own base")
        elif "trim_vocab" in transforms and pair.embedding:
            raise InputError(f"Adapter trains embed_tokens of a {arch.name} model, whose GGUF drops unused vocabulary "
                             "rows", "the number of rows kept is known only from the base GGUF",
                             "pass --base BASE.gguf")
        fold = pair.scale / (alpha / pair.rank) if alpha else pair.scale
        planned.append(PlannedPair(pair, gguf_name, transforms, fold, a_shape, b_shape))
    check_base_copies(adapter, base)
    if not planned:
        raise AdapterError(f"Adapter {adapter.path} holds no LoRA pairs", "", "check the adapter folder")
    planned.sort(key=lambda p: _tensor_order(p.gguf_name))
    return alpha, planned


def check_base_copies(adapter: PeftAdapter, base: BaseModel) -> None:
    """PEFT saves the base's own embed_tokens / lm_head when they are LoRA targets (save_embedding_layers).
    They add nothing when they equal the base; if they differ (resized or trained vocabulary) a LoRA file
    cannot carry them. A sample of rows is compared: a model-sized vocabulary is never loaded whole."""
    name_map = base.arch.name_map(base.n_layers)
    replaced = adapter.replacements()  # modules_to_save: trained, not copies (refused by convert, merged by merge)
    for module, key in adapter.base_copies.items():
        if module in replaced:
            continue
        gguf_name = name_map.get_name(base.arch.normalize_module(module) + ".weight", try_suffixes=(".weight",))
        if gguf_name == "output.weight" and base.tied_embeddings:
            gguf_name = "token_embd.weight"
        if base.tensors is None:
            continue  # a bare config.json: nothing to compare with
        if gguf_name not in base.tensors:
            raise BaseMismatchError(f"Adapter carries a copy of {module}, which base {base.source} does not have",
                                    "the adapter was trained on another model", "pass the adapter's own base")
        shape, want_shape = adapter.shape(key), tuple(base.tensors[gguf_name])
        if shape != want_shape:
            raise UnsupportedError(f"Adapter carries {module} of shape {shape}, base {gguf_name} is {want_shape}",
                                   "the vocabulary was resized during training, and a LoRA file cannot add tokens",
                                   "bake it in with 'gguf-lora merge', or pass the base with the resized vocabulary")
        rows = np.unique(np.linspace(0, shape[0] - 1, num=min(shape[0], 512)).astype(np.int64))
        stored = base.read_tensor(gguf_name, rows)
        if stored is None:
            continue  # shapes known, weights not (should not happen with a GGUF or safetensors base)
        want, qtype = stored
        got = adapter.read(key, rows)
        quantized = qtype not in ("F32", "F16", "BF16")
        rel = float(np.linalg.norm(got - want) / max(float(np.linalg.norm(want)), 1e-30))
        if rel > (0.2 if quantized else 1e-2):
            raise UnsupportedError(f"Adapter carries a {module} that differs from the base's {gguf_name} "
                                   f"(relative difference {rel:.3g})", "those weights were trained or replaced, "
                                   "and a LoRA file carries only low-rank pairs",
                                   "bake it in with 'gguf-lora merge' instead")


def _tensor_order(name: str) -> tuple:
    parts = name.split(".")
    return (0, int(parts[1]), name) if parts[0] == "blk" else (-1 if name.startswith("token") else 1, 0, name)


def transform_rows(arr: np.ndarray, transforms: tuple[str, ...], base: BaseModel) -> np.ndarray:
    """The row transforms the converter applies to a module's output rows (q/k permutation), on lora_b,
    or on any full tensor with those rows (DoRA magnitudes, trained weights and biases in a merge)."""
    for t in transforms:
        heads = base.n_head if t == "permute_q" else base.n_head_kv if t == "permute_k" else None
        if heads is not None and arr.shape[0] % (2 * heads):  # a bare config.json gave no shapes to check
            raise BaseMismatchError(f"A tensor with {arr.shape[0]} rows cannot be split into {heads} heads of two "
                                    "halves (the q/k permutation)", f"base {base.source} does not describe this "
                                    "adapter's attention", "pass the adapter's own base, as a GGUF or HF folder")
        if t == "permute_q":
            arr = permute_rows(arr, base.n_head)
        elif t == "permute_k":
            arr = permute_rows(arr, base.n_head_kv)
    return arr


def pair_arrays(adapter: PeftAdapter, p: PlannedPair, base: BaseModel) -> tuple[np.ndarray, np.ndarray]:
    """lora_a and lora_b in llama.cpp's layout, float32, every transform and the scale fold applied."""
    a = adapter.read(p.pair.a_key)
    b = transform_rows(adapter.read(p.pair.b_key), p.transforms, base)
    if p.pair.embedding:
        a = a.T[: p.a_shape[0]]
    if p.fold != 1.0:
        b = b * np.float32(p.fold)
    return np.ascontiguousarray(a, dtype=np.float32), np.ascontiguousarray(b, dtype=np.float32)


def tensor_type(shape: tuple[int, ...], outtype: str) -> gguf.GGMLQuantizationType:
    """The requested type, or F16 where Q8_0 cannot hold the rows (as llama.cpp's converter falls back)."""
    qtype = OUTTYPES[outtype]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def convert(adapter: str | Path, base: str | Path | None = None, output: str | Path | None = None,
            outtype: str = "f16", force: bool = False, progress: Progress | None = None) -> ConvertResult:
    """Convert a PEFT LoRA folder into a GGUF LoRA for `base`; returns what was written."""
    if outtype not in OUTTYPES:
        raise InputError(f"Unknown output type {outtype!r}", "", f"choose one of {', '.join(OUTTYPES)}")
    peft = load_adapter(adapter)
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

    arrays: dict[int, np.ndarray] = {}

    def produce(i: int) -> np.ndarray:
        if i % 2 == 0:
            arrays[0], arrays[1] = pair_arrays(peft, planned[i // 2], model)
        return encode(arrays.pop(i % 2), specs[i].qtype)

    with atomic_output(out) as tmp:
        write_gguf(tmp, model.arch.name, metadata, specs, produce,
                   (lambda i, n, name: progress((i + 1) // 2, len(planned), name)) if progress else None)
    return ConvertResult(
        output=str(out), arch=model.arch.name, tensors=2 * len(planned),
        ranks=sorted({p.pair.rank for p in planned}), alpha=alpha, bytes=out.stat().st_size, outtype=outtype,
        base=str(model.source), shapes_validated=model.validates_shapes,
        folded_scales=[p.pair.module for p in planned if p.fold != 1.0])
