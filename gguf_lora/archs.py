"""Architecture knowledge as data (archs.json), and the transforms it names, one function each."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import gguf
import numpy as np

TRANSFORMS = ("permute_q", "permute_k", "trim_vocab", "v_heads_rows", "v_heads_scalar_rows", "v_heads_qkv_rows",
              "v_heads_cols", "norm_plus_one")
ROLES = ("gate_up", "gate", "up", "down")  # what an expert parameter or module is in llama.cpp's graph
SPLITS = ("halves", "interleaved")


@dataclass(frozen=True)
class Experts:
    """How an architecture's mixture-of-experts layers look in PEFT (archs.json `experts`)."""

    module: str | None  # module holding the 3-D parameters (transformers >= 5), e.g. mlp.experts
    params: dict[str, str]  # parameter -> role, e.g. gate_up_proj -> gate_up
    gate_up: str  # how gate_up's output rows divide into gate and up: halves | interleaved
    per_expert_module: str | None = None  # transformers 4: <module>.{e}.<leaf>
    per_expert_leaves: dict[str, str] = field(default_factory=dict)  # leaf -> role
    config: dict[str, tuple[str, ...]] = field(default_factory=dict)  # count / ffn -> HF config keys, first wins
    # GGUF expert stem -> the HF parameter (under layers.N.) of the per-expert scale llama.cpp stores as
    # blk.N.<stem>.scale and multiplies into the base product only (gemma4: router.per_expert_scale)
    base_scales: dict[str, str] = field(default_factory=dict)
    fused_gate_up: bool = False  # llama.cpp's converter always writes ffn_gate_up_exps (gemma4), not gate and up


@dataclass(frozen=True)
class Arch:
    name: str
    hf_architectures: tuple[str, ...]
    lora_targets: frozenset[str]
    transforms: dict[str, tuple[str, ...]] = field(default_factory=dict)
    module_prefixes: dict[str, str] = field(default_factory=dict)
    output_slot: bool = True  # llama.cpp loads a separate output.weight when present (else always tied)
    bias_slots: frozenset[str] = frozenset()  # GGUF tensors whose .bias llama.cpp loads when present
    merge_only: frozenset[str] = frozenset()  # GGUF stems llama.cpp multiplies without a LoRA hook
    replaceable: frozenset[str] = frozenset()  # modules_to_save merge may write besides lora_targets
    older_hf_architectures: tuple[str, ...] = ()  # HF classes older conversions wrote as this arch
    experts: Experts | None = None

    def normalize_module(self, module: str) -> str:
        for old, new in self.module_prefixes.items():
            if module.startswith(old):
                module = new + module[len(old):]
                break
        for old, new in shared().module_prefixes.items():
            if module.startswith(old):
                return new + module[len(old):]
        return module

    def transforms_for(self, module: str) -> tuple[str, ...]:
        """The transforms of a module: archs.json keys are leaves or dotted suffixes, the longest match wins."""
        best = max((k for k in self.transforms if module == k or module.endswith("." + k)), key=len, default=None)
        return self.transforms[best] if best is not None else ()

    def accepts(self, hf_architecture: str) -> bool:
        """Whether llama.cpp's converter writes (or once wrote) this HF class as this arch."""
        return hf_architecture in self.hf_architectures or hf_architecture in self.older_hf_architectures

    def name_map(self, n_blocks: int) -> gguf.TensorNameMap:
        return _name_map(self.name, n_blocks)


@dataclass(frozen=True)
class Shared:
    """archs.json `_shared`: rules for every architecture."""

    module_prefixes: dict[str, str]
    non_text_modules: frozenset[str]  # path components of vision / audio / projector towers
    fused_blocks: dict[str, tuple[str, ...]]  # fused GGUF stem -> member stems, rows in that order

    def non_text(self, module: str) -> bool:
        return any(part in self.non_text_modules for part in module.split("."))


def _data() -> dict:
    return json.loads(resources.files(__package__).joinpath("archs.json").read_text())


@lru_cache(maxsize=None)
def shared() -> Shared:
    spec = _data().get("_shared", {})
    fused = {k: tuple(v) for k, v in spec.get("fused_blocks", {}).items()}
    if any(len(v) < 2 for v in fused.values()):
        raise ValueError("archs.json: _shared.fused_blocks needs at least two members per fused tensor")
    return Shared(dict(spec.get("module_prefixes", {})), frozenset(spec.get("non_text_modules", ())), fused)


@lru_cache(maxsize=None)
def _name_map(arch: str, n_blocks: int) -> gguf.TensorNameMap:
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return gguf.get_tensor_name_map(arch_id, n_blocks)


def _experts(name: str, spec: dict | None) -> Experts | None:
    if spec is None:
        return None
    per = spec.get("per_expert") or {}
    experts = Experts(spec.get("module"), dict(spec.get("params", {})), spec.get("gate_up", "halves"),
                      per.get("module"), dict(per.get("leaves", {})),
                      {k: tuple(v) for k, v in spec.get("config", {}).items()}, dict(spec.get("base_scales", {})),
                      bool(spec.get("fused_gate_up", False)))
    roles = set(experts.params.values()) | set(experts.per_expert_leaves.values())
    if (roles - set(ROLES) or experts.gate_up not in SPLITS or set(experts.config) - {"count", "ffn"}
            or set(experts.base_scales) - {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_up_exps"}):
        raise ValueError(f"archs.json: {name}.experts is invalid (roles {sorted(roles)}, gate_up {experts.gate_up!r})")
    return experts


@lru_cache(maxsize=None)
def fused_tensors() -> dict[str, tuple[str, ...]]:
    """archs.json `_fused`: a GGUF stem a base may hold in place of its members (rows in that order)."""
    data = _data().get("_fused", {})
    return {stem: tuple(members) for stem, members in data.items() if not stem.startswith("_")}


@lru_cache(maxsize=None)
def archs() -> dict[str, Arch]:
    data = _data()
    out = {}
    for name, spec in data.items():
        if name.startswith("_"):  # _doc, _shared and other sections that are not architectures
            continue
        if name not in gguf.MODEL_ARCH_NAMES.values():
            raise ValueError(f"archs.json: {name!r} is not a GGUF architecture known to gguf-py")
        transforms = {k: tuple(v) for k, v in spec.get("transforms", {}).items()}
        modules = set(spec["lora_targets"]) | set(spec.get("replaceable", ()))
        for module, names in transforms.items():
            unknown = set(names) - set(TRANSFORMS)
            if unknown or module.rsplit(".", 1)[-1] not in modules:
                raise ValueError(f"archs.json: {name}.transforms.{module} is invalid ({sorted(unknown)})")
        out[name] = Arch(name, tuple(spec["hf_architectures"]), frozenset(spec["lora_targets"]), transforms,
                         dict(spec.get("module_prefixes", {})), bool(spec.get("output_slot", True)),
                         frozenset(spec.get("bias_slots", ())), frozenset(spec.get("merge_only", ())),
                         frozenset(spec.get("replaceable", ())), tuple(spec.get("older_hf_architectures", ())),
                         _experts(name, spec.get("experts")))
    return out


def arch_for_hf(hf_architecture: str) -> Arch | None:
    return next((a for a in archs().values() if hf_architecture in a.hf_architectures), None)


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary permutation of q/k rows (conversion/llama.py LlamaModel.permute), on any (rows, ...)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def reorder_v_heads(n: int, n_k_heads: int, n_v_heads: int, head_dim: int) -> np.ndarray:
    """The index llama.cpp's qwen35 converter applies to value-head rows (conversion/qwen.py _reorder_v_heads):
    from grouped by key head [G0_v0..v{r-1}, G1_v0..] to tiled [G0_v0, G1_v0, .., G0_v1, ..]; new[i] = old[idx[i]]."""
    per_k = n_v_heads // n_k_heads
    assert n == n_v_heads * head_dim, (n, n_v_heads, head_dim)
    return np.arange(n).reshape(n_k_heads, per_k, head_dim).transpose(1, 0, 2).reshape(n)
