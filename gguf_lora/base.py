"""What we know of the base model: architecture, heads, and (when we can read them) every tensor's shape.

A base is a GGUF model (what self-hosters run) or a Hugging Face folder / config.json. Shapes are kept in
numpy order (rows first) under GGUF tensor names.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .archs import Arch, arch_for_hf, archs
from .gguf_read import GGUFFile
from .errors import InputError, UnsupportedError
from .llama_cpp import convert_hf_hint
from .safetensors_io import SafetensorsFile

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


def _field(reader: GGUFFile, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    return value


def read_gguf_base(path: Path) -> BaseModel:
    try:
        reader = GGUFFile(path)
    except Exception as e:  # gguf-py raises ValueError/struct errors/... on damaged files
        raise InputError(f"{path} is not a readable GGUF file ({e})", "the file is damaged or truncated",
                         "download or convert the base model again") from None
    gtype = _field(reader, "general.type", "model")
    if gtype == "adapter":
        raise InputError(f"{path} is a GGUF LoRA adapter, not a base model", "",
                         "pass the model GGUF that the adapter was trained on")
    arch_name = _field(reader, "general.architecture")
    if not arch_name:
        raise InputError(f"{path} has no general.architecture", "it is not a llama.cpp model file",
                         convert_hf_hint())
    arch = _supported(arch_name, path)
    if _field(reader, "split.count", 1) and int(_field(reader, "split.count", 1)) > 1:
        raise InputError(f"{path} is one part of a split GGUF", "a split model's tensors lie in several files",
                         "merge it first with llama-gguf-split --merge")
    n_layers = int(_field(reader, f"{arch_name}.block_count"))
    n_head = _field(reader, f"{arch_name}.attention.head_count")
    n_head_kv = _field(reader, f"{arch_name}.attention.head_count_kv", n_head)
    per_layer = isinstance(n_head, list) or isinstance(n_head_kv, list)
    if per_layer and any(t.startswith("permute") for ts in arch.transforms.values() for t in ts):
        raise UnsupportedError(f"{path} has per-layer head counts", "the q/k permutation needs one head count",
                               "open an issue with the model name")
    if per_layer:  # lfm2 (0 on its conv layers), gemma4 (full vs sliding layers): no transform needs them
        n_head = max(n_head) if isinstance(n_head, list) else n_head
        n_head_kv = max(n_head_kv) if isinstance(n_head_kv, list) else n_head_kv
    tensors = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    n_ff = _field(reader, f"{arch_name}.expert_feed_forward_length", _field(reader, f"{arch_name}.feed_forward_length", 0))
    prefix = arch_name + "."
    hparams = {k[len(prefix):]: _field(reader, k) for k in reader.fields if k.startswith(prefix)}
    return BaseModel(path, "gguf", arch, n_layers, int(n_head), int(n_head_kv or n_head), tensors,
                     "output.weight" not in tensors, reader, int(_field(reader, f"{arch_name}.expert_count", 0) or 0),
                     int(_field(reader, f"{arch_name}.embedding_length", 0) or 0),
                     n_ff if isinstance(n_ff, int) else 0, hparams)


def _hf_config(path: Path) -> tuple[Path, dict]:
    cfg_path = path / "config.json" if path.is_dir() else path
    if not cfg_path.is_file():
        raise InputError(f"{path} has no config.json", "a Hugging Face model folder holds one",
                         "pass the base model's GGUF file or its Hugging Face folder")
    try:
        return cfg_path, json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{cfg_path} is not valid JSON ({e})", "", "pass an intact config.json") from None


def read_hf_base(path: Path) -> BaseModel:
    cfg_path, cfg = _hf_config(path)
    hf_arch = (cfg.get("architectures") or [None])[0]
    arch = arch_for_hf(hf_arch) if hf_arch else None
    if arch is None:
        raise UnsupportedError(f"Base {cfg_path} has architecture {hf_arch!r}, which gguf-lora does not convert yet",
                               "supported: " + ", ".join(a for s in archs().values() for a in s.hf_architectures),
                               "open an issue with the model name")
    text = cfg.get("text_config") or cfg
    n_layers = int(text["num_hidden_layers"])
    n_head = int(text["num_attention_heads"])
    n_head_kv = int(text.get("num_key_value_heads") or n_head)
    tied = bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))
    tensors = None
    spec = arch.experts.config if arch.experts else {}
    first = lambda keys: int(next((text[k] for k in keys if text.get(k)), 0))  # noqa: E731
    n_expert, n_ff_exp = first(spec.get("count", ())), first(spec.get("ffn", ()))
    moe = dict(n_expert=n_expert, n_embd=int(text.get("hidden_size", 0)), n_ff_exp=n_ff_exp)
    folder = cfg_path.parent
    files = sorted(folder.glob("*.safetensors")) if path.is_dir() else []
    if files:
        name_map = arch.name_map(n_layers)
        tensors, where = {}, {}
        for f in files:
            for name, e in SafetensorsFile(f).entries.items():
                gguf_name = name_map.get_name(arch.normalize_module(name), try_suffixes=(".weight", ".bias"))
                if gguf_name:
                    tensors[gguf_name] = e.shape
                    where[gguf_name] = (f, name)
        tied = "output.weight" not in tensors
        if n_expert:  # what llama.cpp's converter writes for the experts (checkpoints store them in many layouts)
            tensors.update(_hf_expert_shapes(text, n_layers, n_expert, moe["n_embd"], n_ff_exp))
        return BaseModel(path, "hf", arch, n_layers, n_head, n_head_kv, tensors, tied, where, **moe, hparams=dict(text))
    return BaseModel(path, "hf", arch, n_layers, n_head, n_head_kv, tensors, tied, **moe, hparams=dict(text))


def _hf_expert_shapes(text: dict, n_layers: int, n_expert: int, n_embd: int, n_ff: int) -> dict[str, tuple]:
    """GGUF expert tensors of an HF MoE model, unfused as convert_hf_to_gguf.py writes them by default.
    Qwen-style configs name dense layers (mlp_only_layers, decoder_sparse_step); others are sparse throughout."""
    dense = set(text.get("mlp_only_layers") or [])
    step = int(text.get("decoder_sparse_step") or 1)
    out = {}
    for i in range(n_layers):
        if i not in dense and (i + 1) % step == 0:
            out[f"blk.{i}.ffn_gate_exps.weight"] = out[f"blk.{i}.ffn_up_exps.weight"] = (n_expert, n_ff, n_embd)
            out[f"blk.{i}.ffn_down_exps.weight"] = (n_expert, n_embd, n_ff)
    return out


def load_base(path: str | Path) -> BaseModel:
    path = Path(path)
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
