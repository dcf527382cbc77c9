"""Architecture knowledge as data (archs.json), and the transforms it names, one function each."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import gguf
import numpy as np

TRANSFORMS = ("permute_q", "permute_k", "trim_vocab")
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


@dataclass(frozen=True)
class Arch:
    name: str
    hf_architectures: tuple[str, ...]
    lora_targets: frozenset[str]
    transforms: dict[str, tuple[str, ...]] = field(default_factory=dict)
    module_prefixes: dict[str, str] = field(default_factory=dict)
    output_slot: bool = True  # llama.cpp loads a separate output.weight when present (else always tied)
    bias_slots: frozenset[str] = frozenset()  # GGUF tensors whose .bias llama.cpp loads when present
    experts: Experts | None = None

    def normalize_module(self, module: str) -> str:
        for old, new in self.module_prefixes.items():
            if module.startswith(old):
                return new + module[len(old):]
        return module

    def name_map(self, n_blocks: int) -> gguf.TensorNameMap:
        return _name_map(self.name, n_blocks)


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
                      {k: tuple(v) for k, v in spec.get("config", {}).items()})
    roles = set(experts.params.values()) | set(experts.per_expert_leaves.values())
    if roles - set(ROLES) or experts.gate_up not in SPLITS or set(experts.config) - {"count", "ffn"}:
        raise ValueError(f"archs.json: {name}.experts is invalid (roles {sorted(roles)}, gate_up {experts.gate_up!r})")
    return experts


@lru_cache(maxsize=None)
def fused_tensors() -> dict[str, tuple[str, ...]]:
    """archs.json `_fused`: a GGUF stem a base may hold in place of its members (rows in that order)."""
    data = json.loads(resources.files(__package__).joinpath("archs.json").read_text()).get("_fused", {})
    return {stem: tuple(members) for stem, members in data.items() if not stem.startswith("_")}


@lru_cache(maxsize=None)
def archs() -> dict[str, Arch]:
    data = json.loads(resources.files(__package__).joinpath("archs.json").read_text())
    data.pop("_doc", None)
    data.pop("_fused", None)
    out = {}
    for name, spec in data.items():
        if name not in gguf.MODEL_ARCH_NAMES.values():
            raise ValueError(f"archs.json: {name!r} is not a GGUF architecture known to gguf-py")
        transforms = {k: tuple(v) for k, v in spec.get("transforms", {}).items()}
        for module, names in transforms.items():
            unknown = set(names) - set(TRANSFORMS)
            if unknown or module not in spec["lora_targets"]:
                raise ValueError(f"archs.json: {name}.transforms.{module} is invalid ({sorted(unknown)})")
        out[name] = Arch(name, tuple(spec["hf_architectures"]), frozenset(spec["lora_targets"]), transforms,
                         dict(spec.get("module_prefixes", {})), bool(spec.get("output_slot", True)),
                         frozenset(spec.get("bias_slots", ())), _experts(name, spec.get("experts")))
    return out


def arch_for_hf(hf_architecture: str) -> Arch | None:
    return next((a for a in archs().values() if hf_architecture in a.hf_architectures), None)


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary permutation of q/k rows (conversion/llama.py LlamaModel.permute), on any (rows, ...)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))
