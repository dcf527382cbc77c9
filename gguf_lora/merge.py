"""Base GGUF (+ adapters) -> merged GGUF in one streaming pass, typed and quantized as llama-quantize would.

Each adapter contributes, per base tensor, factor * lora_b @ lora_a in llama.cpp's layout, the same pairs
`convert` writes (PEFT folders go through the same plan and transforms) or a GGUF LoRA's own pairs.
W' = W + Σ factor_i · B_i A_i is computed in float32, one tensor at a time, then encoded.
"""
from __future__ import annotations

import math
import mmap
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from . import __version__
from .base import BaseModel, is_gguf, read_gguf_base
from .convert import Progress
from .mapping import (EMBEDDINGS, bias_target, pair_arrays, pair_rank, plan, refuse_non_text, replacement_target,
                      runtime_scale, target_shape, text_part, transform_rows, transform_weight)
from .gguf_read import GGUFFile, general_type, lora_reader
from .llama_cpp import convert_hf_hint
from .errors import AdapterError, BaseMismatchError, InputError, UnsupportedError
from .output import TensorSpec, atomic_output, check_output, utf8_text, write_gguf
from .peft import load_adapter, sha256_file
from .quants import WRITABLE, decode, encode_rows
from .typerules import OUTTYPES, is_70b, plan_types
from .validate import usable_path

Q = gguf.GGMLQuantizationType
Pair = Callable[[], tuple[np.ndarray, np.ndarray]]  # -> (lora_a, lora_b) in llama.cpp's layout


@dataclass
class Contribution:
    """What one adapter does to one base tensor: add factor * B @ A (DoRA: then rescale each row to the
    trained magnitude), or replace it outright (modules_to_save)."""

    adapter: str
    factor: float = 0.0  # user scale * alpha / rank (or the user scale when alpha is 0)
    load: Pair | None = None
    magnitude: Callable[[], np.ndarray] | None = None  # DoRA's m, rows in GGUF order
    replace: Callable[[], np.ndarray] | None = None  # modules_to_save: the trained weight, GGUF layout
    add: Callable[[], np.ndarray] | None = None  # a bias update (lora_bias), GGUF layout


@dataclass
class MergeResult:
    output: str
    arch: str
    outtype: str
    tensors: int
    merged_tensors: int
    adapters: list[dict] = field(default_factory=list)
    types: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    # tensors whose rows the planned type's block does not divide, so they got another (llama-quantize's
    # tensor_type_fallback, which warns "N of M tensor(s) required fallback quantization")
    fallbacks: list[dict] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # vision / audio modules skipped (text_only)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_adapter_arg(arg: str) -> tuple[Path, float]:
    """'path' or 'path:scale'. A path may itself hold colons: the whole argument is a path when it exists;
    otherwise what follows the last colon is the scale, and must be a finite number."""
    head, sep, tail = arg.rpartition(":")
    if not sep or (_exists(arg) and not _exists(head)):
        return Path(arg), 1.0
    try:
        scale = float(tail)
    except ValueError:
        if not _exists(head):
            return Path(arg), 1.0  # neither a path nor path:scale; the path check names it
        raise InputError(f"Scale {tail!r} of adapter {head} is not a number", "ADAPTER:SCALE takes a number after "
                         "the last colon", f"write e.g. {head}:0.5") from None
    return Path(head), check_scale(scale, head)


def check_scale(scale: float, adapter: str | Path) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InputError(f"Scale {scale!r} of adapter {adapter} is not a finite number",
                         "the merged weights would be NaN or infinite", f"write e.g. {adapter}:0.5")
    if abs(scale) > 3.4028234663852886e38:  # float32's largest: the scale is recorded (and applied) in float32
        raise InputError(f"Scale {scale!r} of adapter {adapter} is beyond float32's range (±3.4e38)",
                         "the merged weights would be infinite", f"write e.g. {adapter}:0.5")
    return float(scale)


def _exists(path: str) -> bool:
    try:
        return Path(path).exists()
    except (OSError, ValueError):  # a name too long to look up is not an existing path
        return False


def _gguf_lora(path: Path, scale: float, base: BaseModel) -> tuple[dict[str, list[Contribution]], str]:
    reader = lora_reader(path)  # keys typed as llama.cpp reads them
    arch = reader.get("general.architecture", "str")
    if arch != base.arch.name:
        raise BaseMismatchError(f"Adapter {path} is for {arch}, base is {base.arch.name}",
                                "llama.cpp refuses a LoRA of another architecture", "pass the adapter's own base")
    alpha = float(reader.get("adapter.lora.alpha", "float", 0.0))
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for name, t in tensors.items():
        if not name.endswith((".lora_a", ".lora_b")):
            continue
        target = name[: -len(".lora_a")]
        ta, tb = tensors.get(target + ".lora_a"), tensors.get(target + ".lora_b")
        if ta is None or tb is None:
            raise AdapterError(f"{path}: {name} has no {'lora_b' if tb is None else 'lora_a'}",
                               "the file is incomplete", "convert the adapter again")
        if name.endswith(".lora_b"):
            continue
        a_shape = tuple(int(d) for d in reversed(ta.shape.tolist()))
        b_shape = tuple(int(d) for d in reversed(tb.shape.tolist()))
        rank = pair_rank(target, a_shape, b_shape)
        if rank is None:
            raise AdapterError(f"{path}: pair {target} has lora_a {a_shape} and lora_b {b_shape}",
                               "a LoRA pair is two matrices (or two stacks of one per expert) that share their rank",
                               "convert the adapter again")
        for x in (ta, tb):
            try:
                decode(x.data[:1], x.tensor_type)
            except NotImplementedError:
                raise UnsupportedError(f"{path}: {x.name} has type {x.tensor_type.name}, which gguf-lora cannot "
                                       "read", "", "convert the adapter again as f16 or f32") from None
        want = base.tensors.get(target) or (base.tensors.get("token_embd.weight") if target == "output.weight" else None)
        got = target_shape(target, a_shape, b_shape)
        if want is None or tuple(want) != got:
            raise BaseMismatchError(f"Adapter {path} pair {target} has shape {got}, base has "
                                    f"{tuple(want) if want else 'no such tensor'}", "the adapter is for another model",
                                    "pass the adapter's own base")
        load = lambda ta=ta, tb=tb: (decode(ta.data, ta.tensor_type), decode(tb.data, tb.tensor_type))  # noqa: E731
        runtime = runtime_scale(target, base) if len(b_shape) == 3 else None
        if runtime is not None:  # llama.cpp scales this tensor's base product per expert, not the LoRA's: the
            # file's lora_b carries the scale (convert folds it in), the stored weight must not
            load = lambda load=load, s=runtime: (lambda a, b: (a, b / s[:, None, None]))(*load())  # noqa: E731
        out[target] = [Contribution(path.name, scale * (alpha / rank if alpha else 1.0), load)]
    return out, sha256_file(path)


def _peft(path: Path, scale: float, base: BaseModel, text_only: bool = False,
          left_out: list[str] | None = None) -> tuple[dict[str, list[Contribution]], str]:
    adapter = load_adapter(path)
    if text_only:
        adapter, skipped = text_part(adapter)
        if left_out is not None:
            left_out.extend(skipped)
    refuse_non_text(adapter)  # before anything else: a tower's modules_to_save is not ours to judge
    features = adapter.unsupported_features(merging=True)
    if features:
        feature, names = features[0]
        raise UnsupportedError(f"Adapter {path} has {feature}, e.g. {names[0]}", "gguf-lora merge does not bake "
                               "that in yet", "merge it in PyTorch (merge_and_unload) and convert the model")
    out: dict[str, list[Contribution]] = defaultdict(list)
    for module, key in adapter.replacements().items():
        name, transforms = replacement_target(module, base)
        want = base.tensors.get(name) or base.tensors["token_embd.weight"]
        if adapter.shape(key) != tuple(want):
            raise BaseMismatchError(f"Adapter's trained {module} has shape {adapter.shape(key)}, base {name} is "
                                    f"{tuple(want)}", "the adapter is for another model", "pass the adapter's own base")
        load = lambda key=key, t=transforms: transform_weight(adapter.read(key), t, base)  # noqa: E731
        out[name].append(Contribution(path.name, replace=load))
    lora_bias, trained_bias = adapter.biases()
    for module, key in {**trained_bias, **lora_bias}.items():
        name, transforms = bias_target(module, base)
        if module in lora_bias and module not in adapter.pairs:
            raise AdapterError(f"{path}: {key} has no LoRA pair", "the file is inconsistent", "re-save the adapter")
        if module in lora_bias:
            weight = scale * adapter.pairs[module].scale  # PEFT merges bias += scaling * lora_B.bias
            load = lambda key=key, t=transforms, f=weight: transform_rows(adapter.read(key), t, base) * np.float32(f)  # noqa: E731
            out[name].append(Contribution(path.name, add=load))
        else:
            load = lambda key=key, t=transforms: transform_rows(adapter.read(key), t, base)  # noqa: E731
            out[name].append(Contribution(path.name, replace=load))
    magnitudes = adapter.magnitudes()
    alpha, planned = plan(adapter, base, merging=True) if adapter.pairs else (0.0, [])
    for p in planned:
        mag = None
        if p.pair.module in magnitudes:
            if p.pair.embedding:
                raise UnsupportedError(f"Adapter uses DoRA on {p.pair.module}", "gguf-lora merges DoRA for linear "
                                       "layers only", "merge it in PyTorch (merge_and_unload) and convert the model")
            mag = lambda k=magnitudes[p.pair.module], t=p.transforms: transform_rows(  # noqa: E731
                adapter.read(k), t, base)
        load = lambda p=p: pair_arrays(adapter, p, base)  # noqa: E731
        out[p.gguf_name].append(Contribution(path.name, scale * (alpha / p.rank if alpha else 1.0), load, mag))
    return out, adapter.content_hash()


@dataclass
class Prepared:
    """A contribution made ready for one tensor, then applied a slice of rows at a time. The low-rank
    product is formed per slice (B[rows] @ A; per expert for 3-D tensors), so no adapter's delta ever exists
    whole in float32: an expert tensor or a 128256 x 4096 embedding costs a slice, not a tensor."""

    a: np.ndarray | None = None  # lora_a in llama.cpp's layout: (r, in), (vocab, r) for token_embd, (E, r, in)
    b: np.ndarray | None = None  # factor * lora_b: (out, r), (E, out, r)
    embedding: bool = False  # token_embd: rows are lora_a's rows, delta = a @ b.T
    magnitude: np.ndarray | None = None
    replace: np.ndarray | None = None
    add: np.ndarray | None = None

    def delta(self, sl: slice) -> np.ndarray:
        """factor * B @ A for rows sl of the tensor (rows of all experts, expert-major, for a 3-D tensor)."""
        if self.embedding:
            return self.a[sl] @ self.b.T
        if self.b.ndim == 2:
            return self.b[sl] @ self.a
        out = self.b.shape[1]
        start, stop, _ = sl.indices(self.b.shape[0] * out)
        pieces = []
        for e in range(start // out, (stop - 1) // out + 1):
            lo, hi = max(start, e * out) - e * out, min(stop, (e + 1) * out) - e * out
            pieces.append(self.b[e, lo:hi] @ self.a[e])
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def prepare(name: str, c: Contribution) -> Prepared:
    """Load a contribution for one tensor: the factors, with the scale folded into B (the product comes
    per slice, in apply_rows)."""
    if c.replace is not None:
        return Prepared(replace=c.replace())
    if c.add is not None:
        return Prepared(add=c.add())
    a, b = c.load()
    with np.errstate(over="ignore", invalid="ignore"):  # an absurd scale is reported as NaN/Inf per tensor
        b = b * np.float32(c.factor)
    return Prepared(a, b, name in EMBEDDINGS, c.magnitude() if c.magnitude else None)  # lora_a's rows: the embedding's


def apply_rows(w: np.ndarray, sl: slice, p: Prepared) -> np.ndarray:
    """One adapter's effect on rows sl of a float32 tensor (updated in place where possible)."""
    if p.replace is not None:  # 1-D tensors (biases) travel as one row
        return np.array((p.replace.reshape(1, -1) if p.replace.ndim == 1 else p.replace)[sl], dtype=np.float32)
    if p.add is not None:
        w += p.add.reshape(1, -1)
        return w
    w += p.delta(sl)
    if p.magnitude is not None:  # DoRA (PEFT's merge): W' = m / ||W + s·BA||_row · (W + s·BA)
        w *= (p.magnitude[sl] / np.linalg.norm(w, axis=1)).astype(np.float32)[:, None]
    return w


def merge(base: str | Path, adapters: list[tuple[str | Path, float]], output: str | Path, outtype: str = "same",
          force: bool = False, progress: Progress | None = None, text_only: bool = False) -> MergeResult:
    """Bake adapters (PEFT folders or GGUF LoRAs, each with a scale) into base and write it as outtype.

    text_only: leave out an adapter's vision / audio / projector modules (the merged file is the language model;
    llama.cpp's encoders live in the mmproj file) instead of refusing them; they are listed in the result."""
    outtype = outtype.lower()  # Q4_K_M, as llama-quantize spells it, is q4_k_m
    if outtype != "same" and outtype not in OUTTYPES:
        raise InputError(f"Unknown output type {outtype!r}", "", f"choose one of same, {', '.join(OUTTYPES)}")
    base = usable_path(base, "Base ")
    adapters = [(usable_path(a, "Adapter "), check_scale(scale, a)) for a, scale in adapters]
    usable_path(output, "Output ")
    if not base.is_file() or not is_gguf(base):
        raise InputError(f"Base {base} is not a GGUF file", "merge reads and writes llama.cpp model files",
                         convert_hf_hint())
    model = read_gguf_base(base)
    reader: GGUFFile = model._reader
    out = Path(output)
    check_output(out, force, [base, *(Path(a) for a, _ in adapters)])

    contributions: dict[str, list[Contribution]] = defaultdict(list)
    provenance = []
    left_out: list[str] = []
    for path, scale in adapters:
        if path.is_file() and is_gguf(path):
            contrib, digest = _gguf_lora(path, scale, model)
        else:
            contrib, digest = _peft(path, scale, model, text_only, left_out)
        for name, cs in contrib.items():
            contributions[name].extend(cs)
        # the result names the adapter by absolute path; the file records its name, so that the bytes written
        # do not depend on the folder the command ran in
        provenance.append({"adapter": str(path.resolve()), "name": path.resolve().name, "scale": scale,
                           "sha256": digest})

    tensors = {t.name: t for t in reader.tensors}
    order = list(tensors)
    untie = "output.weight" in contributions and "output.weight" not in tensors
    if untie or ("token_embd.weight" in contributions and model.tied_embeddings):
        if not model.arch.output_slot:
            raise UnsupportedError(f"The adapters change token_embd / lm_head, and {model.arch.name} always ties its "
                                   "output projection to token_embd in llama.cpp",
                                   "PEFT changes only one of them, so no merged file can behave the same",
                                   "retrain without embed_tokens / lm_head targets")
        order.append("output.weight")  # keep the output projection as it was (or with its own pairs)
    new_biases = sorted(n for n in contributions if n.endswith(".bias") and n not in tensors)
    order += new_biases  # created where llama.cpp's graph has a slot (checked when planned)
    source = lambda name: tensors["token_embd.weight" if name not in tensors else name]  # noqa: E731

    shapes = {name: tuple(int(d) for d in reversed(source(name).shape.tolist())) for name in order
              if name not in new_biases}
    fallbacks: list[tuple[str, Q, Q]] = []
    types = {} if outtype == "same" else plan_types(
        [(name, shapes[name], source(name).tensor_type) for name in shapes], outtype, model.n_layers,
        is_70b(model.arch.name, model.n_layers, model.n_head, model.n_head_kv), model.n_head // model.n_head_kv,
        model.n_expert, fallbacks)
    specs = []
    for name in order:
        if name in new_biases:  # as long as its weight has rows; llama.cpp keeps 1-D tensors in F32
            specs.append(TensorSpec(name, (model.tensors[name.removesuffix(".bias") + ".weight"][0],), Q.F32))
            continue
        t = source(name)
        qtype = t.tensor_type if outtype == "same" else types[name]
        changed = name in contributions or name not in tensors or qtype != t.tensor_type
        if changed and qtype not in WRITABLE:
            raise UnsupportedError(f"Tensor {name} would be written as {qtype.name}, which gguf-lora cannot encode yet",
                                   "", "choose --outtype f16, q8_0, q4_k_m, q5_k_m, q6_k or another listed type")
        specs.append(TensorSpec(name, shapes[name], qtype))

    page = mmap.PAGESIZE

    def release(offset: int, n_bytes: int) -> None:
        """Drop the base's pages of bytes already used: they are file-backed and would otherwise count towards
        the process's resident memory until the whole model is mapped. The mapping is read-only and shared, so a
        page another thread still reads (a neighbouring slice's first or last one) is simply read in again."""
        start = offset - offset % page
        try:
            reader.data._mmap.madvise(mmap.MADV_DONTNEED, start, offset + n_bytes - start)
        except (AttributeError, OSError, ValueError):
            pass  # no madvise on this platform: only the RSS figure suffers

    def produce(i: int) -> np.ndarray:
        spec = specs[i]
        # tensor i-1 may still be being written (it is produced one ahead): release the one before it
        if i > 1 and specs[i - 2].name not in new_biases:
            done = source(specs[i - 2].name)
            release(done.data_offset, done.n_bytes)
        if spec.name in new_biases:
            w = np.zeros((1, spec.shape[0]), np.float32)
            for c in contributions[spec.name]:
                w = apply_rows(w, slice(0, 1), prepare(spec.name, c))
            return encode_rows(spec.shape, spec.qtype, lambda sl: w[sl])
        t = source(spec.name)
        if spec.name in tensors and spec.name not in contributions and spec.qtype == t.tensor_type:
            return t.data  # untouched: the base's own bytes
        try:
            decode(t.data[:1], t.tensor_type)
        except NotImplementedError:
            raise UnsupportedError(f"Base tensor {t.name} has type {t.tensor_type.name}, which gguf-lora cannot "
                                   "dequantize", "", "use a base in F32, F16, BF16 or a common quantized type") from None
        prepared = [prepare(spec.name, c) for c in contributions.get(spec.name, [])]
        data = t.data.reshape(-1, t.data.shape[-1]) if t.data.ndim > 1 else t.data.reshape(1, -1)

        row_bytes = data.shape[-1] * data.dtype.itemsize

        def rows(sl: slice) -> np.ndarray:
            w = decode(data[sl], t.tensor_type).reshape(-1, spec.shape[-1])
            if not np.may_share_memory(w, data):  # decoded into memory of its own (not a view of F32 bytes)
                # an embedding of 128k rows is 1 GB in F16: its pages go as soon as each slice is decoded
                start = sl.start or 0
                release(t.data_offset + start * row_bytes, (min(sl.stop, len(data)) - start) * row_bytes)
            if prepared:
                w = w if w.flags.writeable and w.base is None else w.copy()
                with np.errstate(over="ignore", invalid="ignore"):  # reported below, naming the tensor
                    for p in prepared:
                        w = apply_rows(w, sl, p)
                if not np.isfinite(w).all():
                    raise AdapterError(f"Merging into {spec.name} produced NaN/Inf", "an adapter's weights or scale "
                                       "are far too large for this tensor", "check the adapter and the scales")
            return w

        return encode_rows(spec.shape, spec.qtype, rows)

    def metadata(writer: gguf.GGUFWriter) -> None:
        for key, f in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture" or key.startswith("gguf_lora."):
                continue
            if outtype != "same" and key in ("general.file_type", "general.quantization_version"):
                continue
            value = f.contents()
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, value, vtype, sub)
        if outtype != "same":
            writer.add_file_type(int(OUTTYPES[outtype][0]))
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_string("gguf_lora.version", __version__)
        if provenance:
            writer.add_array("gguf_lora.adapters", [utf8_text(p["name"]) for p in provenance])
            writer.add_array("gguf_lora.adapter_sha256", [p["sha256"] for p in provenance])
            writer.add_array("gguf_lora.adapter_scales", [float(p["scale"]) for p in provenance])

    with atomic_output(out) as tmp:
        write_gguf(tmp, model.arch.name, metadata, specs, produce, progress)
    return MergeResult(str(out.resolve()), model.arch.name, outtype, len(specs),
                       sum(s.name in contributions for s in specs), provenance,
                       dict(Counter(s.qtype.name for s in specs)), out.stat().st_size,
                       [{"tensor": n, "wanted": w.name, "got": g.name, "columns": shapes[n][-1]}
                        for n, w, g in fallbacks], left_out)


def quantize(source: str | Path, output: str | Path, outtype: str, force: bool = False,
             progress: Progress | None = None) -> MergeResult:
    """Re-type a GGUF model the way llama-quantize does (no imatrix): the merge path with no adapters."""
    outtype = outtype.lower()
    if outtype not in OUTTYPES:  # 'same' included: it would copy the file
        raise InputError(f"Unknown output type {outtype!r}", "quantize writes one of llama-quantize's types",
                         f"choose one of {', '.join(OUTTYPES)}")
    source = usable_path(source, "Input ")
    if not source.is_file() or not is_gguf(source):
        raise InputError(f"Input {source} is not a GGUF file", "quantize reads and writes llama.cpp model files",
                         convert_hf_hint())
    if general_type(source) == "adapter":
        raise InputError(f"Input {source} is a GGUF LoRA adapter, not a model", "quantize re-types a model's weights",
                         "write a q8_0 adapter with 'gguf-lora convert ADAPTER --outtype q8_0', or bake the adapter "
                         "into its base with 'gguf-lora merge'")
    return merge(source, [], output, outtype, force, progress)
