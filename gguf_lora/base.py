"""What we know of the base model: architecture, heads, and (when we can read them) every tensor's shape.

A base is a GGUF model (what self-hosters run) or a Hugging Face folder / config.json. Shapes are kept in
numpy order (rows first) under GGUF tensor names.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .archs import Arch, arch_for_hf, archs
from .gguf_read import GGUFFile
from .errors import InputError, UnsupportedError, shorten
from .llama_cpp import convert_hf_hint
from .safetensors_io import SafetensorsFile
from .validate import checked, load_json_object, usable_path

GGUF_MAGIC = b"GGUF"


@dataclass
class BaseModel:
    source: Path
    kind: str  # "gguf" | "hf"
    arch: Arch
    n_layers: int
    n_head: int
    n_head_kv: int
    tensors: dict[str, tuple[int, ...]] | None  # None: a bare config.json, shapes unknown
    tied_embeddings: bool
    _reader: Any = field(default=None, repr=False)  # GGUFReader, or {gguf name: (safetensors file, key)}
    n_expert: int = 0  # mixture of experts: experts per layer, hidden size and expert ffn size (0: dense)
    n_embd: int = 0
    n_ff_exp: int = 0
    # the GGUF's {arch}.* metadata without the prefix (e.g. "ssm.group_count"), or an HF base's text config
    hparams: dict[str, Any] = field(default_factory=dict, repr=False)

    def read_tensor(self, name: str, rows: np.ndarray | None = None) -> tuple[np.ndarray, str] | None:
        """A 2-D base tensor (or some of its rows) as float32 and its stored type; None without weights."""
        if isinstance(self._reader, GGUFFile):
            t = next((t for t in self._reader.tensors if t.name == name), None)
            if t is None:
                return None
            data = t.data if rows is None else t.data[rows]  # quantized data is (rows, bytes per row)
            return gguf.quants.dequantize(data, t.tensor_type).astype(np.float32), t.tensor_type.name
        if isinstance(self._reader, dict) and name in self._reader:
            f, key = self._reader[name]
            st = SafetensorsFile(f)
            return st.read(key, rows), st.entries[key].dtype
        return None

    @property
    def validates_shapes(self) -> bool:
        return self.tensors is not None


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _supported(arch_name: str, source: Path) -> Arch:
    spec = archs().get(arch_name)
    if spec is None:
        raise UnsupportedError(f"Base {source} has architecture {arch_name!r}, which gguf-lora does not convert yet",
                               f"supported: {', '.join(sorted(archs()))}",
                               "open an issue with the model name; its tensor transforms must be known first")
    return spec


MAX_LAYERS = 512  # LLAMA_MAX_LAYERS: llama.cpp loads no model with more blocks
# <arch>.KEY -> (type, required): keys llama.cpp's load_hparams reads for every supported architecture, with the
# exact GGUF type it accepts (llama-model-loader.cpp GKV::get_kv refuses any other). A base that breaks these
# does not load in llama.cpp, so neither would what merge or quantize make of it.
HPARAMS = {
    "context_length": ("u32", True), "embedding_length": ("u32", True), "block_count": ("u32", True),
    "feed_forward_length": ("u32|arr", False), "attention.head_count": ("u32|arr", True),
    "attention.head_count_kv": ("u32|arr", False), "rope.dimension_count": ("u32", False),
    "rope.freq_base": ("f32", False), "attention.layer_norm_rms_epsilon": ("f32", False),
    "vocab_size": ("u32", False), "attention.key_length": ("u32", False), "attention.value_length": ("u32", False),
}


def _check_heads(source: Path, arch: Arch, n_layers: int, n_head: int, n_head_kv: int,
                 tensors: dict[str, tuple[int, ...]] | None, keys: tuple[str, str, str]) -> None:
    """Counts in range and consistent with each other and with the q/k rows the permutation splits."""
    fix = "convert the base again with llama.cpp's convert_hf_to_gguf.py"
    if not 1 <= n_layers <= MAX_LAYERS:
        raise InputError(f"Base {source} has {keys[0]} = {n_layers}", f"llama.cpp loads 1 to {MAX_LAYERS} blocks", fix)
    if n_head_kv > n_head or n_head % n_head_kv:
        raise InputError(f"Base {source} has {keys[1]} = {n_head} and {keys[2]} = {n_head_kv}",
                         "the key/value heads must divide the attention heads", fix)
    permutes = {t for ts in arch.transforms.values() for t in ts}
    if tensors is None:
        return
    for i in range(n_layers):
        for leaf, heads, key in (("attn_q", n_head, keys[1]), ("attn_k", n_head_kv, keys[2])):
            shape = tensors.get(f"blk.{i}.{leaf}.weight")
            if shape and f"permute_{leaf[-1]}" in permutes and shape[0] % (2 * heads):
                raise InputError(f"Base {source}: blk.{i}.{leaf}.weight has {shape[0]} rows, which {key} = {heads} "
                                 "heads do not split into even halves", "the head count does not match the weights",
                                 fix)


def read_gguf_base(path: Path) -> BaseModel:
    reader = GGUFFile(path)  # a damaged or truncated file is a GGUFError naming it
    gtype = reader.get("general.type", "str", "model")
    if gtype == "adapter":
        raise InputError(f"{path} is a GGUF LoRA adapter, not a base model", "",
                         "pass the model GGUF that the adapter was trained on")
    arch_name = reader.get("general.architecture", "str", None)
    if not arch_name:
        raise InputError(f"{path} has no general.architecture", "it is not a llama.cpp model file",
                         convert_hf_hint())
    arch = _supported(arch_name, path)
    if reader.get("split.count", "int", 1) > 1:
        raise InputError(f"{path} is one part of a split GGUF", "a split model's tensors lie in several files",
                         "merge it first with llama-gguf-split --merge")
    reader.get("split.count", "u16", None)
    for key, (kind, required) in HPARAMS.items():  # what llama.cpp's loader reads, with the types it reads
        reader.get(f"{arch_name}.{key}", kind, *(() if required else (None,)))
    n_layers = reader.get(f"{arch_name}.block_count", "u32")
    n_head = reader.get(f"{arch_name}.attention.head_count", "u32|arr")
    n_head_kv = reader.get(f"{arch_name}.attention.head_count_kv", "u32|arr", n_head)
    for key in ("feed_forward_length", "attention.head_count", "attention.head_count_kv"):
        per_layer = reader.get(f"{arch_name}.{key}", "u32|arr", None)
        if isinstance(per_layer, list) and len(per_layer) != n_layers:
            raise InputError(f"Base {path} has {len(per_layer)} values of {arch_name}.{key} for {n_layers} blocks",
                             "llama.cpp needs one per block", convert_hf_hint())
    per_layer = isinstance(n_head, list) or isinstance(n_head_kv, list)
    if per_layer and any(t.startswith("permute") for ts in arch.transforms.values() for t in ts):
        raise UnsupportedError(f"{path} has per-layer head counts", "the q/k permutation needs one head count",
                               "open an issue with the model name")
    if per_layer:  # lfm2 (0 on its conv layers), gemma4 (full vs sliding layers): no transform needs them
        n_head = max(n_head, default=0) if isinstance(n_head, list) else n_head
        n_head_kv = max(n_head_kv, default=0) if isinstance(n_head_kv, list) else n_head_kv
    if n_head < 1 or n_head_kv < 1:
        raise InputError(f"Base {path} has {n_head} attention heads and {n_head_kv} key/value heads",
                         "a transformer has at least one of each", convert_hf_hint())
    tensors = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise InputError(f"Base {path} has no token_embd.weight", "every model llama.cpp runs has one; this file "
                         "is incomplete or not a model", convert_hf_hint())
    _check_heads(path, arch, n_layers, n_head, n_head_kv, tensors,
                 (f"{arch_name}.block_count", f"{arch_name}.attention.head_count",
                  f"{arch_name}.attention.head_count_kv"))
    n_ff = reader.get(f"{arch_name}.expert_feed_forward_length", "int", None)
    if n_ff is None:
        n_ff = reader.get(f"{arch_name}.feed_forward_length", "u32|arr", 0)
    prefix = arch_name + "."
    hparams = {k[len(prefix):]: f.contents() for k, f in reader.fields.items() if k.startswith(prefix)}
    return BaseModel(path, "gguf", arch, n_layers, n_head, n_head_kv, tensors,
                     "output.weight" not in tensors, reader, reader.get(f"{arch_name}.expert_count", "int", 0),
                     reader.get(f"{arch_name}.embedding_length", "u32"),
                     n_ff if isinstance(n_ff, int) else 0, hparams)


def _hf_config(path: Path) -> tuple[Path, dict]:
    cfg_path = path / "config.json" if path.is_dir() else path
    if not cfg_path.is_file():
        raise InputError(f"{path} has no config.json", "a Hugging Face model folder holds one",
                         "pass the base model's GGUF file or its Hugging Face folder")
    return cfg_path, load_json_object(cfg_path, InputError, "pass the base model's intact config.json")


def read_hf_base(path: Path) -> BaseModel:
    cfg_path, cfg = _hf_config(path)
    fix = "pass the base model's intact config.json"
    names = checked(cfg, "architectures", "str|strs", cfg_path, default=[], fix=fix)
    hf_arch = names if isinstance(names, str) else (names[0] if names else None)  # a string names one
    arch = arch_for_hf(hf_arch) if hf_arch else None
    supported = ", ".join(a for s in archs().values() for a in s.hf_architectures)
    if not hf_arch:
        raise InputError(f"Base {cfg_path} has no architectures entry", f"it names the model class ({supported})",
                         fix)
    if arch is None:
        raise UnsupportedError(f"Base {cfg_path} has architecture {shorten(hf_arch)!r}, which gguf-lora does not "
                               "convert yet", f"supported: {supported}", "open an issue with the model name")
    text = checked(cfg, "text_config", "dict", cfg_path, default=cfg, fix=fix) or cfg
    where = "text_config." if text is not cfg else ""
    n_layers = checked(text, "num_hidden_layers", "int>0", cfg_path, fix=fix, shown=where + "num_hidden_layers")
    n_head = checked(text, "num_attention_heads", "int>0", cfg_path, fix=fix, shown=where + "num_attention_heads")
    n_head_kv = checked(text, "num_key_value_heads", "int>0", cfg_path, default=n_head, fix=fix,
                      shown=where + "num_key_value_heads")
    tied = checked(cfg, "tie_word_embeddings", "bool", cfg_path, fix=fix,
                 default=checked(text, "tie_word_embeddings", "bool", cfg_path, default=True, fix=fix,
                               shown=where + "tie_word_embeddings"))
    keys = (where + "num_hidden_layers", where + "num_attention_heads", where + "num_key_value_heads")
    tensors = None
    spec = arch.experts.config if arch.experts else {}

    def first(keys: tuple[str, ...]) -> int:  # the first of the config's names for a count that is set
        return next((checked(text, k, "int>=0", cfg_path, fix=fix, shown=where + k) for k in keys if text.get(k)), 0)

    n_expert, n_ff_exp = first(spec.get("count", ())), first(spec.get("ffn", ()))
    moe = dict(n_expert=n_expert, n_embd=first(("hidden_size",)), n_ff_exp=n_ff_exp)
    if n_expert:
        checked(text, "mlp_only_layers", "list", cfg_path, default=[], fix=fix, shown=where + "mlp_only_layers")
        checked(text, "decoder_sparse_step", "int>0", cfg_path, default=1, fix=fix,
                shown=where + "decoder_sparse_step")
    folder = cfg_path.parent
    files = sorted(folder.glob("*.safetensors")) if path.is_dir() else []
    if files:
        _check_heads(cfg_path, arch, n_layers, n_head, n_head_kv, None, keys)
        name_map = arch.name_map(n_layers)
        tensors, where_ = {}, {}
        scales = arch.experts.base_scales if arch.experts else {}
        for f in files:
            for name, e in SafetensorsFile(f).entries.items():
                hit = next((m for stem, hf in scales.items()
                            if (m := re.search(rf"(?:^|\.)layers\.(\d+)\.{re.escape(hf)}$", name))), None)
                if hit:  # llama.cpp's converter stores it as blk.N.<stem>.scale (archs.json experts.base_scales)
                    stem = next(s for s, hf in scales.items() if name.endswith(hf))
                    where_[f"blk.{hit.group(1)}.{stem}.scale"] = (f, name)
                    continue
                gguf_name = name_map.get_name(arch.normalize_module(name), try_suffixes=(".weight", ".bias"))
                if gguf_name:
                    tensors[gguf_name] = e.shape
                    where_[gguf_name] = (f, name)
        _check_heads(cfg_path, arch, n_layers, n_head, n_head_kv, tensors, keys)
        tied = "output.weight" not in tensors
        if n_expert:  # what llama.cpp's converter writes for the experts (checkpoints store them in many layouts)
            tensors.update(_hf_expert_shapes(text, n_layers, n_expert, moe["n_embd"], n_ff_exp,
                                             arch.experts.fused_gate_up))
        return BaseModel(path, "hf", arch, n_layers, n_head, n_head_kv, tensors, tied, where_, **moe,
                         hparams=dict(text))
    _check_heads(cfg_path, arch, n_layers, n_head, n_head_kv, None, keys)
    return BaseModel(path, "hf", arch, n_layers, n_head, n_head_kv, tensors, tied, **moe, hparams=dict(text))


def _hf_expert_shapes(text: dict, n_layers: int, n_expert: int, n_embd: int, n_ff: int,
                      fused: bool = False) -> dict[str, tuple]:
    """GGUF expert tensors of an HF MoE model, unfused as convert_hf_to_gguf.py writes them by default (fused:
    the architecture's converter always writes ffn_gate_up_exps).
    Qwen-style configs name dense layers (mlp_only_layers, decoder_sparse_step); others are sparse throughout."""
    dense = set(text.get("mlp_only_layers") or [])
    step = int(text.get("decoder_sparse_step") or 1)
    out = {}
    for i in range(n_layers):
        if i not in dense and (i + 1) % step == 0:
            if fused:
                out[f"blk.{i}.ffn_gate_up_exps.weight"] = (n_expert, 2 * n_ff, n_embd)
            else:
                out[f"blk.{i}.ffn_gate_exps.weight"] = out[f"blk.{i}.ffn_up_exps.weight"] = (n_expert, n_ff, n_embd)
            out[f"blk.{i}.ffn_down_exps.weight"] = (n_expert, n_embd, n_ff)
    return out


def load_base(path: str | Path) -> BaseModel:
    path = usable_path(path, "Base ")
    if not path.exists():
        raise InputError(f"Base {path} does not exist", "",
                         "pass the base model's GGUF file or its Hugging Face folder with --base")
    if path.is_file() and is_gguf(path):
        return read_gguf_base(path)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        raise InputError(f"Base {path} is a PEFT adapter folder, not a base model", "",
                         "pass the base model's GGUF file or its Hugging Face folder")
    if path.is_file() and path.suffix == ".gguf":
        raise InputError(f"{path} does not start with the GGUF magic", "the file is damaged or not a GGUF",
                         "download or convert the base model again")
    return read_hf_base(path)
