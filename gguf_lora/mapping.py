"""Where each PEFT tensor lands in a GGUF model, and how: the one place convert, merge and inspect read.

A PEFT adapter holds a low-rank pair per HF module (lora_A (r, in), lora_B (out, r)); llama.cpp applies a
pair per GGUF tensor. Between the two lie:
- names: HF module -> GGUF tensor (gguf-py's TensorNameMap, archs.json's module prefixes);
- transforms, one function each, named per architecture in archs.json: row transforms of lora_B (the q/k
  rotary permutation), the embedding's vocabulary cut;
- parts: a GGUF pair is assembled from Parts, each one PEFT pair's share: some of its B rows (a split of a
  fused module: gate_up into gate and up, by halves or interleaved), landing at some output rows and rank
  columns of the target (several modules fused into one GGUF tensor: A concatenated along the rank, B
  block-diagonal). Splits and fused targets are chosen by which tensors exist in the base (archs.json
  `_fused`);
- experts: 3-D pairs, lora_a (E, r, in) / lora_b (E, out, r), applied per selected expert by llama.cpp
  (build_lora_mm_id). PEFT writes them stacked (transformers >= 5: one ParamWrapper per 3-D parameter,
  lora_A (E*r, in) expert-major, lora_B (out, r*E) expert-minor) or per expert (transformers 4 modules);
  both are checked against the base's expert count and sizes, which llama.cpp itself does not check. A
  per-expert scale llama.cpp applies to the base product only (gemma4's ffn_down_exps.scale) is folded into
  a written GGUF LoRA's lora_b (runtime_scale), never into a merge;
- the scale fold: PEFT's per-module scale folded into B, so that llama.cpp's alpha / rank reproduces it.
- the families' rules (archs.json): lora_a column transforms (qwen35's value-head reorder of out_proj), fused
  blocks (a --fuse-qkv base's attn_qkv: q/k/v pairs stacked into one), modules llama.cpp applies no LoRA to
  (vision and audio towers: refused unless only the text part is asked for; tensors the graph multiplies
  without a LoRA hook: merge only). Names, shapes and which tensors exist always come from the base.

The same plan serves `convert` (written as a GGUF LoRA), `merge` (baked into the weights) and `inspect`
(does it fit?), so the three cannot disagree.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .archs import fused_tensors, permute_rows, reorder_v_heads, shared
from .base import BaseModel, load_base
from .errors import AdapterError, BaseMismatchError, GgufLoraError, InputError, UnsupportedError
from .peft import LoraPair, PeftAdapter

def _v_heads(base: BaseModel) -> tuple[int, int, int, int]:
    """qwen35's linear attention (key heads, value heads, key head dim, value head dim): from the base GGUF
    (ssm.group_count, ssm.time_step_rank, ssm.state_size, ssm.inner_size = value dim * value heads, as
    conversion/qwen.py Qwen3NextModel.set_gguf_parameters writes them) or an HF config."""
    h = base.hparams
    try:
        if "ssm.group_count" in h:
            nk, nv, dk = int(h["ssm.group_count"]), int(h["ssm.time_step_rank"]), int(h["ssm.state_size"])
            return nk, nv, dk, int(h["ssm.inner_size"]) // nv
        return (int(h["linear_num_key_heads"]), int(h["linear_num_value_heads"]), int(h["linear_key_head_dim"]),
                int(h["linear_value_head_dim"]))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        raise InputError(f"Base {base.source} lacks the linear-attention head counts (ssm.group_count, "
                         "ssm.time_step_rank, ssm.state_size, ssm.inner_size)", "the value-head order of "
                         "in_proj_qkv / in_proj_z / in_proj_a / in_proj_b / out_proj depends on them",
                         "pass the base GGUF written by llama.cpp's convert_hf_to_gguf.py") from None


def v_heads_index(n: int, base: BaseModel, head_dim: int | None = None) -> np.ndarray | None:
    """The value-head reorder of n rows (or columns) of the base's qwen35 linear attention; None where the
    converter leaves them alone (as many value heads as key heads: conversion/qwen.py checks the same)."""
    nk, nv, _, dv = _v_heads(base)
    if nk == nv:
        return None
    return reorder_v_heads(n, nk, nv, dv if head_dim is None else head_dim)


def v_heads_rows(arr: np.ndarray, base: BaseModel, head_dim: int | None = None) -> np.ndarray:
    """in_proj_z (value head dim) and in_proj_a / in_proj_b (one row per value head): reorder lora_B rows."""
    idx = v_heads_index(arr.shape[0], base, head_dim)
    return arr if idx is None else arr[idx]


def v_heads_qkv_rows(arr: np.ndarray, base: BaseModel) -> np.ndarray:
    """in_proj_qkv: q and k rows (key heads x key head dim each) stay, the value rows after them are reordered."""
    nk, _, dk, _ = _v_heads(base)
    qk = 2 * nk * dk
    idx = v_heads_index(arr.shape[0] - qk, base)
    return arr if idx is None else np.concatenate([arr[:qk], arr[qk:][idx]])


def v_heads_cols(arr: np.ndarray, base: BaseModel) -> np.ndarray:
    """out_proj: its input columns are value heads, so the reorder falls on lora_A's columns."""
    idx = v_heads_index(arr.shape[-1], base)
    return arr if idx is None else arr[..., idx]


# Row transforms archs.json may name for a module, applied to lora_B (or any tensor with the module's output
# rows: DoRA magnitudes, trained weights and biases in a merge). trim_vocab is a cut of the embedding's
# lora_A rows, decided in plan (it needs the base's row count).
ROW_TRANSFORMS: dict[str, Callable[[np.ndarray, BaseModel], np.ndarray]] = {
    "permute_q": lambda arr, base: permute_rows(arr, base.n_head),
    "permute_k": lambda arr, base: permute_rows(arr, base.n_head_kv),
    "v_heads_rows": v_heads_rows,
    "v_heads_scalar_rows": lambda arr, base: v_heads_rows(arr, base, head_dim=1),
    "v_heads_qkv_rows": v_heads_qkv_rows,
}
# Transforms of a module's input columns: applied to lora_a (r, in) and to fully trained weights.
COLUMN_TRANSFORMS: dict[str, Callable[[np.ndarray, BaseModel], np.ndarray]] = {
    "v_heads_cols": v_heads_cols,
}
# Transforms of the stored weight values themselves, for fully trained weights a merge writes (modules_to_save):
# norm_plus_one: the converter stores (1 + w) for RMSNorms that compute x * (1 + w) (conversion/qwen.py L400).
VALUE_TRANSFORMS: dict[str, Callable[[np.ndarray, BaseModel], np.ndarray]] = {
    "norm_plus_one": lambda arr, base: arr + np.float32(1.0),
}
# Tensors llama.cpp looks up by token (get_rows): their lora_a is stored (vocab, r).
EMBEDDINGS = ("token_embd.weight", "per_layer_token_embd.weight")


# llama.cpp's expert tensors (every architecture) and, per role, (in, out) in units of (hidden, expert ffn)
EXPERT_STEMS = {"gate_up": "ffn_gate_up_exps", "gate": "ffn_gate_exps", "up": "ffn_up_exps", "down": "ffn_down_exps"}
_ROLE_DIMS = {"gate_up": ((1, 0), (0, 2)), "gate": ((1, 0), (0, 1)), "up": ((1, 0), (0, 1)), "down": ((0, 1), (1, 0))}


@dataclass(frozen=True)
class Part:
    """One PEFT pair's share of a GGUF pair: lora_B rows `rows` (after `transforms`, times `fold`) land at
    output rows `offset`.. and rank columns `rank_offset`.. of the target; its lora_A fills those rank rows.
    Experts: a stacked pair (pair.experts > 0) fills every expert slot, a per-expert pair only `expert`."""

    pair: LoraPair
    transforms: tuple[str, ...] = ()
    fold: float = 1.0  # lora_b *= fold, so that alpha_file / rank * fold == PEFT's scale
    rows: tuple[int, int | None, int] | None = None  # (start, stop, step) of B's rows; None: all
    offset: int = 0
    rank_offset: int = 0
    expert: int | None = None


@dataclass
class PlannedPair:
    """A GGUF pair: the base tensor it adds to, the shapes written, and the parts it is made of."""

    gguf_name: str  # base tensor name, e.g. blk.0.attn_q.weight
    parts: tuple[Part, ...]
    a_shape: tuple[int, ...]  # lora_a in llama.cpp's layout, numpy order (token_embd: (vocab, r); experts (E, r, in))
    b_shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        return self.b_shape[-1]

    @property
    def experts(self) -> int:
        return self.a_shape[0] if len(self.a_shape) == 3 else 0

    @property
    def pair(self) -> LoraPair:
        """The PEFT pair this one comes from (the first, for a fused target)."""
        return self.parts[0].pair

    @property
    def transforms(self) -> tuple[str, ...]:
        return self.parts[0].transforms

    @property
    def fold(self) -> float:
        return self.parts[0].fold

    @property
    def modules(self) -> list[str]:
        return sorted({p.pair.module for p in self.parts})


@dataclass
class _Place:
    """A part before the target's rank layout (and so the fold) is known."""

    target: str
    pair: LoraPair
    transforms: tuple[str, ...]
    rows: tuple[int, int | None, int] | None
    n_rows: int
    offset: int
    group: str  # pairs of one group share rank columns (the experts of one per-expert module)
    expert: int | None = None
    checked: bool = False  # the single-module checks against the base already ran


def refuse_unsupported(adapter: PeftAdapter) -> None:
    """A GGUF LoRA carries low-rank pairs only: name the first feature it cannot carry."""
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
    """The base the adapter lands on: the one given (checked against the one it was trained on, when that is
    a local folder), else its base_model_name_or_path when that is a local folder."""
    hint = adapter.config.get("base_model_name_or_path")
    if base is not None:
        model = load_base(base)
        recorded = _local(hint)
        if recorded and Path(base).resolve() != recorded.resolve():
            try:
                trained_on = load_base(recorded).arch.name
            except GgufLoraError:
                trained_on = None  # unreadable or unsupported: the pair checks still apply
            if trained_on and trained_on != model.arch.name and not _converted_as(recorded, model):
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


def _converted_as(hf_folder: Path, base: BaseModel) -> bool:
    """Whether llama.cpp's converter writes (or once wrote) the HF model in hf_folder as base's architecture:
    an older GGUF of Mistral Small 3.x says llama where a newer one says mistral3 (archs.json
    older_hf_architectures). The architecture written into an adapter is always the base GGUF's."""
    try:
        cfg = json.loads((hf_folder / "config.json").read_text())
        return any(base.arch.accepts(a) for a in cfg.get("architectures") or [])
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def pair_rank(name: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> int | None:
    """The rank two GGUF tensors share as llama.cpp reads a pair, or None when they are no pair: lora_a (r, in)
    and lora_b (out, r); an embedding's lora_a (vocab, r) and lora_b (n_embd, r); an expert pair (E, r, in) and
    (E, out, r)."""
    if len(a_shape) == len(b_shape) == 3 and a_shape[0] == b_shape[0] and a_shape[1] == b_shape[2]:
        rank = b_shape[2]
    elif len(a_shape) == len(b_shape) == 2 and a_shape[1 if name in EMBEDDINGS else 0] == b_shape[1]:
        rank = b_shape[1]
    else:
        return None
    return rank if rank > 0 else None


def target_shape(name: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The base tensor shape a pair in llama.cpp's layout fits (token_embd's pair is stored flipped; an
    expert pair (E, r, in) / (E, out, r) fits (E, out, in), and both must agree on E)."""
    if len(a_shape) == 3 or len(b_shape) == 3:
        experts = a_shape[0] if len(a_shape) == 3 and len(b_shape) == 3 and a_shape[0] == b_shape[0] else -1
        return (experts, b_shape[-2], a_shape[-1])
    return (a_shape[0], b_shape[0]) if name in EMBEDDINGS else (b_shape[0], a_shape[1])


def _gguf_name(base: BaseModel, module: str) -> str | None:
    return base.arch.name_map(base.n_layers).get_name(module + ".weight", try_suffixes=(".weight",))


def _fold(scale: float, alpha: float, rank: int) -> float:
    """The factor folded into lora_b so that llama.cpp's alpha / rank (or 1 when alpha is 0) gives `scale`."""
    return scale / (alpha / rank) if alpha else scale


def _linear(pair: LoraPair, base: BaseModel, merging: bool) -> list[_Place]:
    """A Linear or Embedding module (or a 2-D ParamWrapper such as a router weight): one GGUF tensor."""
    arch = base.arch
    module = arch.normalize_module(pair.unwrapped)
    leaf = module.rsplit(".", 1)[-1]
    gguf_name = _gguf_name(base, module)
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
    if pair.embedding != (gguf_name in EMBEDDINGS):
        raise AdapterError(f"Module {pair.module} has {'embedding' if pair.embedding else 'linear'} LoRA weights "
                           f"but maps to {gguf_name}", "the adapter does not fit this architecture",
                           "pass the adapter's own base")
    if pair.stacked:
        raise AdapterError(f"Module {pair.module} stacks {pair.experts} experts' LoRA weights but maps to {gguf_name}, "
                           "which is not an expert tensor", "the adapter does not fit this architecture",
                           "pass the adapter's own base")
    refuse_merge_only(pair, gguf_name, arch, merging)
    transforms = arch.transforms_for(module)
    rows = pair.b_shape[0]
    if base.tensors is not None and gguf_name not in base.tensors and not (gguf_name == "output.weight" and
                                                                          base.tied_embeddings and untie):
        return _route(pair, gguf_name, transforms, rows, None, module, base)
    a_shape, b_shape = pair.a_shape, pair.b_shape
    if pair.embedding:
        a_shape = (a_shape[1], a_shape[0])  # llama.cpp reads token_embd.lora_a as (vocab, r)
    if base.tensors is not None:
        want = base.tensors["token_embd.weight" if gguf_name not in base.tensors else gguf_name]
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
    return [_Place(gguf_name, pair, transforms, None, rows, 0, pair.module, checked=True)]


def _route(pair: LoraPair, name: str, transforms: tuple[str, ...], n_rows: int, split: str | None, module: str,
           base: BaseModel, group: str | None = None, expert: int | None = None) -> list[_Place]:
    """Land a module's rows on tensor `name`, or wherever the base holds them: a fused module on its fused
    tensor (interleaved rows regrouped into llama.cpp's order) or split into the members the base holds
    instead; a member module on its rows of a fused tensor the base holds."""
    fused = fused_tensors()
    prefix, stem = name.rsplit(".", 2)[0] + ".", name.split(".")[-2]
    held = lambda n: base.tensors is None or n in base.tensors  # noqa: E731
    group = group or pair.module

    def place(target, rows, n, offset):
        return _Place(target, pair, transforms, rows, n, offset, group, expert)

    members = fused.get(stem, ())
    if members and (not held(name) or base.tensors is None):  # split (a bare config: the converter's default)
        if all(held(f"{prefix}{m}.weight") for m in members):
            k = len(members)
            if n_rows % k:
                raise BaseMismatchError(f"Adapter module {module} has {n_rows} output rows, which do not divide into "
                                        f"{', '.join(members)}", "the adapter was trained on another model size",
                                        "pass the adapter's own base")
            n = n_rows // k
            return [place(f"{prefix}{m}.weight", (i, None, k) if split == "interleaved" else (i * n, (i + 1) * n, 1),
                          n, 0) for i, m in enumerate(members)]
    if held(name):
        if members and split == "interleaved":  # the fused tensor holds the members one after the other
            k = len(members)
            return [place(name, (i, None, k), n_rows // k, i * (n_rows // k)) for i in range(k)]
        return [place(name, None, n_rows, 0)]
    for fused_stem, parts in fused.items():
        target = f"{prefix}{fused_stem}.weight"
        if stem in parts and target in base.tensors:
            size = base.tensors[target][-2] // len(parts)
            return [place(target, None, n_rows, parts.index(stem) * size)]
    raise BaseMismatchError(f"Adapter targets {module} ({name}), which base {base.source} does not have",
                            "the adapter was trained on another model", "pass the adapter's own base")


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _expert_dims(base: BaseModel, layer: int, module: str) -> tuple[int, int, int]:
    """(experts, hidden, expert ffn) of one layer: from its expert tensors, else from the base's metadata."""
    tensors = base.tensors or {}
    for role, stem in EXPERT_STEMS.items():
        shape = tensors.get(f"blk.{layer}.{stem}.weight")
        if shape is not None and len(shape) == 3:
            e, out, inp = shape
            return (e, out, inp) if role == "down" else (e, inp, out // 2 if role == "gate_up" else out)
    if base.tensors is None and base.n_expert and base.n_embd and base.n_ff_exp:
        return base.n_expert, base.n_embd, base.n_ff_exp
    raise BaseMismatchError(f"Adapter adapts the experts {module}, and base {base.source} has no experts in layer "
                            f"{layer}", "the adapter was trained on another model", "pass the adapter's own base")


def _check_dims(pair: LoraPair, role: str, dims: tuple[int, int, int], module: str) -> None:
    _, hidden, ffn = dims
    (ih, ii), (oh, oi) = _ROLE_DIMS[role]
    want_in, want_out = ih * hidden + ii * ffn, oh * hidden + oi * ffn
    if (pair.a_shape[1], pair.b_shape[0]) != (want_in, want_out):
        raise BaseMismatchError(f"Adapter's {module} ({role}) has in {pair.a_shape[1]}, out {pair.b_shape[0]}, but "
                                f"the base's experts have in {want_in}, out {want_out}",
                                "the adapter was trained on another model size", "pass the adapter's own base")


def _experts(adapter: PeftAdapter, pair: LoraPair, base: BaseModel) -> list[_Place] | None:
    """Expert pairs: a stacked ParamWrapper (transformers >= 5) or one expert's module (transformers 4);
    None for anything else."""
    arch, spec = base.arch, base.arch.experts
    module = arch.normalize_module(pair.unwrapped)
    layer = _LAYER.search(module)
    per_expert = re.search(r"\.experts\.(\d+)\.([^.]+)$", module)
    stacked = pair.stacked
    if spec is None:
        if stacked or per_expert:
            raise UnsupportedError(f"Adapter adapts the experts {pair.unwrapped}, and gguf-lora does not know how "
                                   f"{arch.name} lays out its experts", "a wrong split or order would be silently "
                                   "wrong", "open an issue with the model name")
        return None
    if layer is None:
        return None
    n_layer = int(layer.group(1))
    prefix = module[: layer.end()]
    if pair.wrapper and spec.module and module == prefix + spec.module:
        dims = _expert_dims(base, n_layer, pair.unwrapped)
        experts, hidden, ffn = dims
        candidates = [(p, role) for p, role in spec.params.items() if p in pair.params] or list(spec.params.items())
        found = []
        for param, role in candidates:
            (ih, ii), (oh, oi) = _ROLE_DIMS[role]
            if (pair.a_shape[1], pair.b_shape[0]) == (ih * hidden + ii * ffn, oh * hidden + oi * ffn):
                found.append((param, role))
        if len(found) != 1:
            raise AdapterError(f"Adapter's {pair.module} has lora_A {pair.a_shape} and lora_B {pair.b_shape}, which "
                               f"match neither expert projection of base {base.source} ("
                               + "; ".join(f"{p}: in {ih * hidden + ii * ffn}, out {oh * hidden + oi * ffn}"
                                           for p, r in candidates for (ih, ii), (oh, oi) in [_ROLE_DIMS[r]])
                               + ")", "the adapter was trained on another model", "pass the adapter's own base")
        param, role = found[0]
        rank, alpha = adapter.rank_alpha(f"{pair.unwrapped}.{param}")
        rows = pair.a_shape[0]
        if rank < 1 or rows % rank or rows // rank != experts:
            said = f"{rows // rank} experts of rank {rank}" if rank > 0 and rows % rank == 0 else f"rank {rank}"
            raise BaseMismatchError(f"Adapter's {pair.module} ({param}) stacks {rows} rows in lora_A: {said} per "
                                    f"its config, but base {base.source} has {experts} experts in layer {n_layer}",
                                    "lora_A holds experts x rank rows; llama.cpp does not check the expert count "
                                    "(a wrong one writes out of bounds at run time)",
                                    "pass the adapter's own base and the adapter_config.json saved with it")
        pair = replace(pair, rank=rank, alpha=alpha, scale=adapter.scale_for(rank, alpha), experts=experts,
                       params=(param,))
        name = f"blk.{n_layer}.{EXPERT_STEMS[role]}.weight"
        return _route(pair, name, (), pair.b_shape[0], spec.gate_up if role == "gate_up" else None,
                      f"{pair.unwrapped}.{param}", base)
    expert, leaf = (int(per_expert.group(1)), per_expert.group(2)) if per_expert else (None, None)
    if (per_expert and spec.per_expert_module and leaf in spec.per_expert_leaves
            and module == f"{prefix}{spec.per_expert_module}.{expert}.{leaf}"):
        role = spec.per_expert_leaves[leaf]
        dims = _expert_dims(base, n_layer, pair.module)
        if expert >= dims[0]:
            raise BaseMismatchError(f"Adapter adapts expert {expert} ({pair.module}), and base {base.source} has "
                                    f"{dims[0]} experts in layer {n_layer}", "llama.cpp does not check the expert "
                                    "count (a wrong one writes out of bounds at run time)", "pass the adapter's own base")
        _check_dims(pair, role, dims, pair.module)
        name = f"blk.{n_layer}.{EXPERT_STEMS[role]}.weight"
        stem = f"{module[: per_expert.start()]}.experts.{leaf}"
        return _route(pair, name, (), pair.b_shape[0], None, stem, base, group=stem, expert=expert)
    if stacked or per_expert:
        raise UnsupportedError(f"Adapter adapts {pair.module}, which gguf-lora does not know as an expert module of "
                               f"{arch.name}", f"known: {spec.module} ({', '.join(spec.params)})"
                               + (f", {spec.per_expert_module}.N.{{{','.join(spec.per_expert_leaves)}}}"
                                  if spec.per_expert_module else ""), "open an issue with the model name")
    return None


def _places(adapter: PeftAdapter, pair: LoraPair, base: BaseModel, merging: bool) -> list[_Place]:
    return _experts(adapter, pair, base) or _linear(pair, base, merging)


def _assemble(target: str, places: list[_Place], base: BaseModel, alpha: float) -> PlannedPair:
    """One GGUF pair from its places: rank columns per group (A concatenated, B block-diagonal), experts
    stacked, folds for the target's rank, shapes checked against the base."""
    if len(places) == 1 and places[0].checked:  # a module onto its own tensor, checked already
        p = places[0]
        a_shape, b_shape = p.pair.a_shape, p.pair.b_shape
        if p.pair.embedding:
            a_shape = (a_shape[1], a_shape[0])
            want = (base.tensors or {}).get(target)
            if want is not None and "trim_vocab" in p.transforms and a_shape[0] > want[0]:
                a_shape = (want[0], a_shape[1])
        part = Part(p.pair, p.transforms, _fold(p.pair.scale, alpha, p.pair.rank))
        return PlannedPair(target, (part,), a_shape, b_shape)
    groups: dict[str, int] = {}  # group -> its rank, in the order of the rows they land on
    for p in sorted(places, key=lambda p: (p.offset, p.group)):
        if groups.setdefault(p.group, p.pair.rank) != p.pair.rank:
            ranks = sorted({q.pair.rank for q in places if q.group == p.group})
            raise AdapterError(f"Adapter's {p.group} has ranks {ranks} across experts", "llama.cpp stores one rank "
                               f"per tensor ({target})", "retrain with one rank for all experts (rank_pattern)")
    offsets, rank = {}, 0
    for group, r in groups.items():
        offsets[group], rank = rank, rank + r
    want = (base.tensors or {}).get(target)
    experts = 0
    if want is not None and len(want) == 3:
        experts = want[0]
    elif any(p.expert is not None or p.pair.stacked for p in places):
        experts = base.n_expert or max([p.pair.experts for p in places if p.pair.stacked]
                                       + [p.expert + 1 for p in places if p.expert is not None])
    inputs = {p.pair.a_shape[1] for p in places}
    if len(inputs) != 1:
        raise BaseMismatchError(f"Adapter modules {', '.join(sorted({p.pair.module for p in places}))} disagree on "
                                f"their input size ({sorted(inputs)}) but all land on {target}",
                                "the adapter was trained on another model", "pass the adapter's own base")
    n_in = inputs.pop()
    out = want[-2] if want is not None else max(p.offset + p.n_rows for p in places)
    a_shape = (rank, n_in) if not experts else (experts, rank, n_in)
    b_shape = (out, rank) if not experts else (experts, out, rank)
    if want is not None and target_shape(target, a_shape, b_shape) != tuple(want):
        raise BaseMismatchError(f"Adapter modules {', '.join(sorted({p.pair.module for p in places}))} give "
                                f"{target} shape {target_shape(target, a_shape, b_shape)} but the base tensor is "
                                f"{tuple(want)}", "the adapter was trained on another model size",
                                "pass the adapter's own base")
    for p in places:
        if p.offset + p.n_rows > out:
            raise BaseMismatchError(f"Adapter module {p.pair.module} has more output rows than {target} holds",
                                    "the adapter was trained on another model size", "pass the adapter's own base")
    parts = tuple(Part(p.pair, p.transforms, _fold(p.pair.scale, alpha, rank), p.rows, p.offset, offsets[p.group],
                       p.expert) for p in places)
    return PlannedPair(target, parts, a_shape, b_shape)


def plan(adapter: PeftAdapter, base: BaseModel, merging: bool = False) -> tuple[float, list[PlannedPair]]:
    """Validate every pair against the base and decide names, parts, transforms and the file alpha.

    merging: the pairs are baked into the weights, so a tied base is no obstacle where the architecture
    has a slot for a separate output tensor (an lm_head pair then lands on a new output.weight)."""
    refuse_non_text(adapter)  # first: --text-only also drops a tower's modules_to_save
    if not merging:
        refuse_unsupported(adapter)
    alpha = float(adapter.config["lora_alpha"])
    targets: dict[str, list[_Place]] = {}
    fused: dict[str, list[tuple[int, LoraPair]]] = {}
    for pair in adapter.pairs.values():
        if (target := fused_target(pair, base)) is not None:  # a --fuse-qkv base: q/k/v land on attn_qkv
            fused.setdefault(target[0], []).append((target[1], pair))
            continue
        for place in _places(adapter, pair, base, merging):
            targets.setdefault(place.target, []).append(place)
    planned = [_assemble(target, places, base, alpha) for target, places in targets.items()]
    planned.extend(assemble_fused(fused, base, alpha, adapter))
    check_base_copies(adapter, base)
    if not planned:
        raise AdapterError(f"Adapter {adapter.path} holds no LoRA pairs", "", "check the adapter folder")
    planned.sort(key=lambda p: tensor_order(p.gguf_name))
    return alpha, planned


def check_base_copies(adapter: PeftAdapter, base: BaseModel) -> None:
    """PEFT saves the base's own embed_tokens / lm_head when they are LoRA targets (save_embedding_layers).
    They add nothing when they equal the base; if they differ (resized or trained vocabulary) a LoRA file
    cannot carry them. A sample of rows is compared: a model-sized vocabulary is never loaded whole."""
    replaced = adapter.replacements()  # modules_to_save: trained, not copies (refused by convert, merged by merge)
    for module, key in adapter.base_copies.items():
        if module in replaced:
            continue
        gguf_name = _gguf_name(base, base.arch.normalize_module(module))
        if gguf_name == "output.weight" and base.tied_embeddings:
            gguf_name = "token_embd.weight"
        if base.tensors is None:
            continue  # a bare config.json: nothing to compare with
        if gguf_name not in base.tensors:
            raise BaseMismatchError(f"Adapter carries a copy of {module}, which base {base.source} does not have",
                                    "the adapter was trained on another model", "pass the adapter's own base")
        shape, want_shape = adapter.shape(key), tuple(base.tensors[gguf_name])
        if _trimmed(base, shape, want_shape):
            shape = want_shape  # the converter cut the vocabulary to the tokenizer's: compare the rows it kept
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


def _trimmed(base: BaseModel, shape: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """An embedding-sized tensor with more rows than the base's, on an arch whose converter trims token_embd to
    the tokenizer's vocabulary (gemma3 / gemma4: trim_vocab; the tied output is that same tensor)."""
    trims = any("trim_vocab" in ts for ts in base.arch.transforms.values())
    return trims and len(shape) == 2 and shape[1:] == want[1:] and shape[0] > want[0]


def tensor_order(name: str) -> tuple:
    """llama.cpp's converters write token_embd first, then the blocks in order, then the rest."""
    parts = name.split(".")
    return (0, int(parts[1]), name) if parts[0] == "blk" else (-1 if name.startswith("token") else 1, 0, name)


def transform_columns(arr: np.ndarray, transforms: tuple[str, ...], base: BaseModel) -> np.ndarray:
    """The column transforms the converter applies to a module's inputs (qwen35 out_proj), on lora_a or on a
    fully trained weight."""
    for t in transforms:
        if t in COLUMN_TRANSFORMS:
            arr = COLUMN_TRANSFORMS[t](arr, base)
    return arr


def transform_weight(arr: np.ndarray, transforms: tuple[str, ...], base: BaseModel) -> np.ndarray:
    """Everything the converter does to a module's weight (rows, columns of a 2-D weight, stored values):
    for the fully trained weights a merge writes in place of the base's (modules_to_save)."""
    arr = transform_rows(arr, transforms, base)
    if arr.ndim == 2:
        arr = transform_columns(arr, transforms, base)
    for t in transforms:
        if t in VALUE_TRANSFORMS:
            arr = VALUE_TRANSFORMS[t](arr, base)
    return arr


def transform_rows(arr: np.ndarray, transforms: tuple[str, ...], base: BaseModel) -> np.ndarray:
    """The row transforms the converter applies to a module's output rows (q/k permutation), on lora_b,
    or on any full tensor with those rows (DoRA magnitudes, trained weights and biases in a merge)."""
    for t in transforms:
        heads = base.n_head if t == "permute_q" else base.n_head_kv if t == "permute_k" else None
        if heads is not None and arr.shape[0] % (2 * heads):  # a bare config.json gave no shapes to check
            raise BaseMismatchError(f"A tensor with {arr.shape[0]} rows cannot be split into {heads} heads of two "
                                    "halves (the q/k permutation)", f"base {base.source} does not describe this "
                                    "adapter's attention", "pass the adapter's own base, as a GGUF or HF folder")
        if t in ROW_TRANSFORMS:
            arr = ROW_TRANSFORMS[t](arr, base)
    return arr


def _part_arrays(adapter: PeftAdapter, part: Part, a_rows: int, base: BaseModel) -> tuple[np.ndarray, np.ndarray]:
    """One part's lora_a and lora_b rows, transformed and folded, float32: (r, in) / (n, r), or for a stacked
    pair (E, r, in) / (E, n, r) (PEFT stacks A expert-major and B expert-minor: B.reshape(out, r, E))."""
    pair = part.pair
    a = adapter.read(pair.a_key)
    b = adapter.read(pair.b_key)
    if pair.stacked:
        e, r = pair.experts, pair.rank
        a = a.reshape(e, r, a.shape[-1])
        b = b.reshape(b.shape[0], r, e).transpose(2, 0, 1)
        if part.rows is not None:
            b = b[:, slice(*part.rows)]
    else:
        a = transform_columns(a, part.transforms, base)
        b = transform_rows(b, part.transforms, base)
        if part.rows is not None:
            b = b[slice(*part.rows)]
    if pair.embedding:
        a = a.T[:a_rows]
    if part.fold != 1.0:
        b = b * np.float32(part.fold)
    return a, b


def runtime_scale(name: str, base: BaseModel) -> np.ndarray | None:
    """The per-expert scale (E,) that llama.cpp multiplies into the base product of expert tensor `name` only,
    never into a LoRA's (build_lora_mm_id's w_s, src/llama-graph.cpp): gemma4's router.per_expert_scale,
    stored as blk.N.ffn_down_exps.scale (conversion/gemma.py). None where the arch has none (archs.json
    experts.base_scales) or the base GGUF holds none (then llama.cpp applies none)."""
    spec = base.arch.experts
    parts = name.split(".")
    if spec is None or len(parts) != 4 or parts[2] not in spec.base_scales:
        return None
    scale_name = f"{parts[0]}.{parts[1]}.{parts[2]}.scale"
    got = base.read_tensor(scale_name)
    if got is None:
        if base.kind == "gguf":
            return None
        raise InputError(f"Base {base.source} has no weights to read {spec.base_scales[parts[2]]} of layer "
                         f"{parts[1]} from", f"llama.cpp scales {parts[2]}'s base product per expert by it and its "
                         "LoRA not, so the adapter's lora_b must carry it", "pass the base GGUF or the full HF folder")
    scale = np.asarray(got[0], dtype=np.float32).reshape(-1)
    if not np.all(np.isfinite(scale)) or np.any(scale == 0):
        raise UnsupportedError(f"Base {base.source} has a zero or non-finite {scale_name}",
                               "a LoRA delta cannot be expressed against an expert whose base product is scaled "
                               "by it", "check the base model")
    return scale


def pair_arrays(adapter: PeftAdapter, p: PlannedPair, base: BaseModel,
                runtime: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """lora_a and lora_b in llama.cpp's layout, float32, every transform and the scale fold applied (for
    experts: (E, r, in) and (E, out, r)). runtime: for a GGUF LoRA that llama.cpp applies at run time, with
    the per-expert scales it multiplies into the base product only folded into lora_b (runtime_scale); a
    merge adds B A to the stored weight, which llama.cpp then scales itself."""
    a, b = _pair_arrays(adapter, p, base)
    scale = runtime_scale(p.gguf_name, base) if runtime and p.experts else None
    if scale is not None:
        if scale.shape[0] != b.shape[0]:
            raise BaseMismatchError(f"Base {base.source} has {scale.shape[0]} per-expert scales for "
                                    f"{p.gguf_name}, which has {b.shape[0]} experts", "the base is damaged",
                                    "convert the base again")
        b = b * scale[:, None, None]
    return a, b


def _pair_arrays(adapter: PeftAdapter, p: PlannedPair, base: BaseModel) -> tuple[np.ndarray, np.ndarray]:
    first = p.parts[0]
    if (len(p.parts) == 1 and first.rows is None and not first.offset and first.expert is None
            and first.pair.b_shape[0] == p.b_shape[-2]):  # one module onto all of its tensor's rows
        a, b = _part_arrays(adapter, first, p.a_shape[0], base)
        return np.ascontiguousarray(a, dtype=np.float32), np.ascontiguousarray(b, dtype=np.float32)
    a = np.zeros(p.a_shape, np.float32)
    b = np.zeros(p.b_shape, np.float32)
    for part in p.parts:
        pa, pb = _part_arrays(adapter, part, p.a_shape[0], base)
        r, n = pa.shape[-2], pb.shape[-2]
        ranks, rows = slice(part.rank_offset, part.rank_offset + r), slice(part.offset, part.offset + n)
        if part.expert is not None:
            a[part.expert, ranks], b[part.expert, rows, ranks] = pa, pb
        else:  # parts of one source share its rank columns
            a[..., ranks, :], b[..., rows, ranks] = pa, pb
    return a, b


def replacement_target(module: str, base: BaseModel) -> tuple[str, tuple[str, ...]]:
    """GGUF name and row transforms of a module that modules_to_save trains fully (merge replaces it)."""
    arch = base.arch
    module = arch.normalize_module(module)
    leaf = module.rsplit(".", 1)[-1]
    if leaf not in arch.lora_targets | arch.replaceable:
        raise UnsupportedError(f"Adapter fully trains {module} (modules_to_save)", "gguf-lora merges trained "
                               f"weights only for {', '.join(sorted(arch.lora_targets | arch.replaceable))}, whose "
                               "GGUF layout it knows", "merge it in PyTorch (merge_and_unload) and convert the model")
    name = "output.weight" if leaf == "lm_head" else _gguf_name(base, module)
    if leaf in ("lm_head", "embed_tokens") and base.tied_embeddings and not arch.output_slot:
        raise UnsupportedError(f"Adapter fully trains {module}, and {arch.name} always ties its output projection "
                               "to token_embd in llama.cpp", "PEFT changes only one of them",
                               "retrain without embed_tokens / lm_head in modules_to_save")
    return name, arch.transforms_for(module)


def bias_target(module: str, base: BaseModel) -> tuple[str, tuple[str, ...]]:
    """GGUF name of a module's bias; it must exist in the base or have a slot in llama.cpp's graph."""
    arch = base.arch
    module = arch.normalize_module(module)
    name = arch.name_map(base.n_layers).get_name(module + ".bias", try_suffixes=(".bias",))
    stem = name.split(".")[-2] if name else None
    if name is None or (name not in base.tensors and stem not in arch.bias_slots):
        raise UnsupportedError(f"Adapter trains a bias for {module}", f"{arch.name} in llama.cpp has no bias for "
                               f"{name or 'that module'}, so the merged model cannot carry it",
                               "retrain with bias='none' and lora_bias=False for that module")
    return name, arch.transforms_for(module)


def _stem(gguf_name: str) -> str:
    """blk.3.shortconv.in_proj.weight -> shortconv.in_proj; per_layer_model_proj.weight -> per_layer_model_proj."""
    parts = gguf_name.rsplit(".", 1)[0].split(".")
    return ".".join(parts[2:] if parts[0] == "blk" else parts)


def refuse_merge_only(pair: LoraPair, gguf_name: str, arch, merging: bool) -> None:
    """llama.cpp loads a pair for a tensor its graph multiplies without a LoRA hook and never applies it."""
    if not merging and _stem(gguf_name) in arch.merge_only:
        raise UnsupportedError(f"Adapter targets {pair.module} ({gguf_name}), which llama.cpp's {arch.name} graph "
                               "uses without a LoRA hook", "llama.cpp would load the pair and silently never apply it",
                               "bake it in with 'gguf-lora merge', or retrain without that module")


def _tower(module: str) -> str:
    parts = set(module.split("."))
    if any("audio" in p for p in parts & shared().non_text_modules):
        return "audio encoder"
    if any("projector" in p for p in parts & shared().non_text_modules):
        return "multimodal projector"
    return "vision encoder"


def non_text_modules(adapter: PeftAdapter) -> list[str]:
    """The adapter's modules (and other tensors) in vision, audio or projector towers (archs.json _shared)."""
    rule = shared()
    names = [*adapter.pairs, *adapter.base_copies, *adapter.others]
    return sorted({n for n in names if rule.non_text(n)})


def refuse_non_text(adapter: PeftAdapter) -> None:
    """llama.cpp applies LoRA to the language model only: tools/mtmd (vision and audio encoders, projectors) has
    none. Transformers names the vision MLP like the text one, so target lists catch it: refuse by name."""
    found = non_text_modules(adapter)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise UnsupportedError(f"LoRA on {found[0]}{more}: llama.cpp's {_tower(found[0])} takes no LoRA",
                               "llama.cpp applies adapters to the language model only (tools/mtmd has no LoRA), so "
                               "that part of the adapter would silently do nothing", "pass --text-only (text_only=True)"
                               " to convert the language part and list what is left out, or retrain with "
                               "target_modules limited to the language model")


def text_part(adapter: PeftAdapter) -> tuple[PeftAdapter, list[str]]:
    """The adapter without its vision / audio / projector modules, and what was left out."""
    left = non_text_modules(adapter)
    if not left:
        return adapter, []
    gone = set(left)
    kept = replace(adapter, pairs={m: p for m, p in adapter.pairs.items() if m not in gone},
                   others=[k for k in adapter.others if k not in gone],
                   base_copies={m: k for m, k in adapter.base_copies.items() if m not in gone})
    return kept, left


def fused_target(pair: LoraPair, base: BaseModel) -> tuple[str, int] | None:
    """(fused GGUF tensor, block index) where the base holds this module's tensor fused with others (archs.json
    _shared.fused_blocks, e.g. attn_q of a --fuse-qkv base inside attn_qkv); None otherwise."""
    if base.tensors is None or pair.embedding:
        return None
    module = base.arch.normalize_module(pair.module)
    if module.rsplit(".", 1)[-1] not in base.arch.lora_targets:
        return None
    name = _gguf_name(base, module)
    if name is None or name in base.tensors or not name.startswith("blk."):
        return None
    block, stem = ".".join(name.split(".")[:2]), _stem(name)
    for fused, members in shared().fused_blocks.items():
        if stem in members and f"{block}.{fused}.weight" in base.tensors:
            return f"{block}.{fused}.weight", members.index(stem)
    return None


def _block_rows(fused_name: str, members: tuple[str, ...], base: BaseModel,
                known: dict[int, int]) -> list[int]:
    """Rows of each block of a fused tensor: the adapter's own B rows where it adapts the member, else from the
    base's head counts (attn_qkv: k = head_count_kv x key_length, v = head_count_kv x value_length, q the rest,
    which also covers a gated q of twice the width as qwen35's)."""
    total = base.tensors[fused_name][0]
    if len(known) == len(members):
        return [known[i] for i in range(len(members))]
    h = base.hparams
    head_k = h.get("attention.key_length") or base.tensors[fused_name][1] // max(base.n_head, 1)
    head_v = h.get("attention.value_length") or head_k
    if members == ("attn_q", "attn_k", "attn_v") and isinstance(base.n_head_kv, int):
        k, v = base.n_head_kv * int(head_k), base.n_head_kv * int(head_v)
        return [total - k - v, k, v]
    raise BaseMismatchError(f"Base {base.source} holds {fused_name} fused, and the adapter does not adapt every part "
                            "of it", "the size of each part is not known", "adapt all of its parts, or pass a base "
                            "converted without fused tensors")


def assemble_fused(groups: dict[str, list[tuple[int, LoraPair]]], base: BaseModel, alpha: float,
                   adapter: PeftAdapter) -> list[PlannedPair]:
    """One GGUF pair per fused tensor: lora_a = the members' A stacked along the rank, lora_b block-diagonal (each
    member's B at its block's rows and its own rank columns), every block's scale folded against the combined rank
    that llama.cpp divides alpha by. Transforms (q/k permutation) apply per block, as the converter applies them
    before fusing (conversion/base.py modify_tensors)."""
    out = []
    magnitudes = adapter.magnitudes()
    for fused_name, found in sorted(groups.items()):
        members = next(m for f, m in shared().fused_blocks.items() if fused_name.endswith(f".{f}.weight"))
        found = sorted(found, key=lambda item: item[0])
        dora = [p.module for _, p in found if p.module in magnitudes]
        if dora:
            raise UnsupportedError(f"Adapter uses DoRA on {dora[0]}, which base {base.source} holds fused in "
                                   f"{fused_name}", "DoRA's row norms would have to be taken over the fused tensor",
                                   "merge it in PyTorch (merge_and_unload), or pass a base without fused tensors")
        rows = _block_rows(fused_name, members, base, {i: p.b_shape[0] for i, p in found})
        want = base.tensors[fused_name]
        if sum(rows) != want[0] or any(p.a_shape[1] != want[1] for _, p in found):
            raise BaseMismatchError(f"Adapter modules {', '.join(p.module for _, p in found)} have shapes that do not "
                                    f"fit base tensor {fused_name} {tuple(want)}", "the adapter was trained on another "
                                    "model size", "pass the adapter's own base")
        for i, p in found:
            if p.b_shape[0] != rows[i]:
                raise BaseMismatchError(f"Adapter module {p.module} has {p.b_shape[0]} output rows but its part of "
                                        f"{fused_name} has {rows[i]}", "the adapter was trained on another model",
                                        "pass the adapter's own base")
        rank = sum(p.rank for _, p in found)
        parts, rank_offset = [], 0
        for i, p in found:
            transforms = base.arch.transforms_for(base.arch.normalize_module(p.module))
            parts.append(Part(p, transforms, _fold(p.scale, alpha, rank), None, sum(rows[:i]), rank_offset))
            rank_offset += p.rank
        out.append(PlannedPair(fused_name, tuple(parts), (rank, want[1]), (want[0], rank)))
    return out
