"""Reading PEFT adapter folders: the config's semantics, the LoRA pairs and their effective scales.

The scale rules are PEFT's own (peft.tuners.lora.layer.update_layer and peft.utils.other.get_pattern_key):
s = alpha / r, or alpha / sqrt(r) with use_rslora; rank_pattern / alpha_pattern override r / alpha for
modules whose name ends with the pattern at a dot boundary (the key is a regex).
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AdapterError, InputError, UnsupportedError, brief, shorten
from .patterns import PatternError, compile_key, first_keys, get_pattern_key as _bounded_pattern_key
from .safetensors_io import MAX_NAME, SafetensorsFile
from .validate import KINDS, checked, is_int, load_json_object, usable_path

CONFIG = "adapter_config.json"
SAFETENSORS = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"

_MAGNITUDE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")
_FULL = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)(?:\.modules_to_save\.[^.]+)?\.weight$")
_BIAS = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)(?P<lora>\.lora_B(?:\.[^.]+)?)?\.bias$")
_PAIR = re.compile(r"^(?P<module>.+)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$")
_PREFIXES = ("base_model.model.",)
_WRAPPED = ".base_layer"
# PEFT's save_embedding_layers writes the base model's own embedding / output weights beside the pairs.
_BASE_COPY = re.compile(r"^(?:base_model\.model\.)?(?P<module>(?:.+\.)?(?:embed_tokens|lm_head))(?:\.base_layer)?\.weight$")

# Features a GGUF LoRA file cannot carry: (name, how to recognise its tensors).
_FEATURES = (
    ("DoRA (lora_magnitude_vector)", re.compile(r"\.lora_magnitude_vector")),
    ("LoRA biases (lora_bias)", re.compile(r"\.lora_B(\.[^.]+)?\.bias$")),
    ("trainable tokens (trainable_token_indices)", re.compile(r"trainable_tokens")),
    ("fully trained modules (modules_to_save)", re.compile(r"\.modules_to_save\.")),
)


def _in_modules_to_save(module: str, cfg: dict[str, Any]) -> bool:
    """PEFT names modules_to_save by a suffix of the module path (e.g. 'lm_head', 'embed_tokens')."""
    return any(module == m or module.endswith("." + m) for m in cfg.get("modules_to_save") or [])


def get_pattern_key(pattern_keys, key: str) -> str:
    """PEFT's rule: the first pattern that matches the end of the module name at a dot boundary (bounded in
    time: see patterns.py)."""
    return _bounded_pattern_key(pattern_keys, key)


def peft_scale(rank: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _rank_alpha(cfg: dict[str, Any], key: str) -> tuple[int, float]:
    """PEFT's rank and alpha for one module or parameter key. load_adapter has already checked every pattern
    key (valid, and matched in bounded time), so none raises here."""
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    return (int(rank_pattern.get(get_pattern_key(rank_pattern, key), cfg["r"])),
            float(alpha_pattern.get(get_pattern_key(alpha_pattern, key), cfg["lora_alpha"])))


@dataclass
class LoraPair:
    """One adapted module: ΔW = scale · B @ A (embeddings: ΔE = (B @ A)ᵀ, looked up by token)."""

    module: str  # HF module path without the PEFT prefix, e.g. model.layers.3.self_attn.q_proj
    embedding: bool
    a_key: str
    b_key: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    dtype: str
    rank: int
    alpha: float
    scale: float
    # PEFT's ParamWrapper (target_parameters): the parameters it may adapt, and for a 3-D parameter (stacked
    # experts) how many experts lora_A (experts * rank, in) / lora_B (out, rank * experts) stack. Both are
    # read from the config here; mapping decides which parameter a wrapper is by its shape against the base.
    params: tuple[str, ...] = ()
    experts: int = 0

    @property
    def hf_weight(self) -> str:
        return self.module + ".weight"

    @property
    def wrapper(self) -> bool:
        return bool(self.params) or self.module.endswith(_WRAPPED)

    @property
    def stacked(self) -> bool:
        """A 3-D parameter's pair: lora_A (experts * rank, in), lora_B (out, rank * experts)."""
        return self.wrapper and self.experts > 1

    @property
    def unwrapped(self) -> str:
        """The adapted module: nested ParamWrappers (one per parameter) save under module.base_layer..."""
        module = self.module
        while module.endswith(_WRAPPED):
            module = module[: -len(_WRAPPED)]
        return module


@dataclass
class PeftAdapter:
    path: Path
    config: dict[str, Any]
    weights_file: Path
    pairs: dict[str, LoraPair]
    others: list[str] = field(default_factory=list)  # tensors that are not LoRA pairs
    base_copies: dict[str, str] = field(default_factory=dict)  # module -> key of a saved base weight
    _reader: Any = None

    @property
    def name(self) -> str:
        return self.path.name

    def magnitudes(self) -> dict[str, str]:
        """DoRA: module -> key of its lora_magnitude_vector."""
        out = {}
        for key in self.others:
            m = _MAGNITUDE.match(key)
            if m:
                out[m.group("module")] = key
        return out

    def replacements(self) -> dict[str, str]:
        """modules_to_save: module -> key of the fully trained weight that replaces the base's."""
        out = {m: k for m, k in self.base_copies.items() if _in_modules_to_save(m, self.config)}
        for key in self.others:
            m = _FULL.match(key)
            if m and _in_modules_to_save(m.group("module"), self.config):
                out[m.group("module")] = key
        return out

    def biases(self) -> tuple[dict[str, str], dict[str, str]]:
        """(lora_bias: module -> key of lora_B's bias, trained biases (bias='all'/'lora_only'): module -> key)."""
        lora, trained = {}, {}
        for key in self.others:
            m = _BIAS.match(key)
            if m:
                (lora if m.group("lora") else trained)[m.group("module")] = key
        return lora, trained

    def unsupported_features(self, merging: bool = False) -> list[tuple[str, list[str]]]:
        """Features present that a plain GGUF LoRA cannot express (or, merging, that merge cannot bake in),
        each with the tensors that show it."""
        found = []
        cfg = self.config
        handled = set()
        if merging:
            lora_bias, trained_bias = self.biases()
            handled = {*self.magnitudes().values(), *self.replacements().values(), *lora_bias.values(),
                       *trained_bias.values()}
        for feature, rx in _FEATURES:
            names = [n for n in self.others if rx.search(n) and n not in handled]
            if feature.startswith("DoRA") and cfg.get("use_dora") and not names and not merging:
                names = ["(use_dora in adapter_config.json)"]
            if names:
                found.append((feature, names))
        claimed = {n for _, names in found for n in names} | handled
        rest = [n for n in self.others if n not in claimed]
        biases = [n for n in rest if n.endswith(".bias")]
        if biases:
            found.append(("trained biases (bias='all' or 'lora_only')", biases))
        full = [n for n in rest if not n.endswith(".bias")]
        if full:
            found.append(("full tensors besides the LoRA pairs", full))
        saved = [k for m, k in self.base_copies.items() if _in_modules_to_save(m, cfg) and k not in handled]
        if saved:
            found.append(("fully trained modules (modules_to_save)", saved))
        if cfg.get("layer_replication"):
            found.append(("layer_replication", ["(adapter_config.json)"]))
        return found

    def read(self, key: str, rows: np.ndarray | None = None) -> np.ndarray:
        """A tensor (or some of its rows) as float32, NaN/Inf refused with the tensor named."""
        if isinstance(self._reader, SafetensorsFile):
            arr = self._reader.read(key, rows)
        else:
            t = self._reader[key]
            arr = (t if rows is None else t[rows]).float().numpy()
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise AdapterError(f"Tensor {key} of {self.weights_file} holds {bad} NaN/Inf values",
                               "the adapter's training diverged or the file is damaged",
                               "use a checkpoint from before the divergence")
        return arr

    def rank_alpha(self, key: str) -> tuple[int, float]:
        """PEFT's rank and alpha for a module or parameter key (rank_pattern / alpha_pattern, else r / lora_alpha)."""
        return _rank_alpha(self.config, key)

    def scale_for(self, rank: int, alpha: float) -> float:
        return peft_scale(rank, alpha, bool(self.config.get("use_rslora")))

    def shape(self, key: str) -> tuple[int, ...]:
        if isinstance(self._reader, SafetensorsFile):
            return self._reader.entries[key].shape
        return tuple(self._reader[key].shape)

    def content_hash(self) -> str:
        return sha256_file(self.weights_file)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (provenance of adapters in outputs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# Every adapter_config.json key gguf-lora reads, with the type it must have (null counts as absent). PEFT's
# LoraConfig declares these types; a value of another type would make PEFT fail, or us compute nonsense.
CONFIG_KEYS = {
    "peft_type": "str", "r": "int>0", "lora_alpha": "number>=0", "use_rslora": "bool", "use_dora": "bool",
    "rank_pattern": "dict", "alpha_pattern": "dict", "target_modules": "str|strs", "target_parameters": "strs",
    "modules_to_save": "strs", "layer_replication": "list", "base_model_name_or_path": "str",
    "alora_invocation_tokens": "list", "lora_bias": "bool", "bias": "str",
}
_CONFIG_FIX = "fix it in adapter_config.json, or use the config saved with the weights (save_pretrained)"


def _config_error(cfg_path: Path, what: str, why: str = "") -> AdapterError:
    return AdapterError(f"{cfg_path}: {what}", why, _CONFIG_FIX)


def _load_config(path: Path) -> dict[str, Any]:
    """adapter_config.json parsed and every key we use type-checked: the boundary for the config."""
    cfg_path = path / CONFIG
    if not cfg_path.is_file():
        raise InputError(f"{path} has no {CONFIG}", "a PEFT adapter folder holds its config beside its weights",
                         "pass the folder written by model.save_pretrained()")
    cfg = load_json_object(cfg_path, AdapterError, "re-save the adapter config (save_pretrained)")
    peft_type = checked(cfg, "peft_type", "str", cfg_path, error=AdapterError, default="", fix=_CONFIG_FIX)
    if peft_type.upper() != "LORA":
        raise UnsupportedError(f"{path} is {'a ' + shorten(peft_type, 40) if peft_type else 'an untyped'} adapter, "
                               "not LoRA",
                               "only LoRA adapters have a GGUF form that llama.cpp loads",
                               "train a LoRA adapter (peft_type LORA)")
    for key, kind in CONFIG_KEYS.items():
        required = key in ("r", "lora_alpha")
        checked(cfg, key, kind, cfg_path, error=AdapterError, fix=_CONFIG_FIX,
                **({} if required else {"default": None}))
    for key, kind in (("rank_pattern", "int>0"), ("alpha_pattern", "number>=0")):
        said = KINDS[kind][1]
        for pattern, value in (cfg.get(key) or {}).items():
            if not KINDS[kind][0](value):
                raise _config_error(cfg_path, f"{key}[{shorten(pattern, 60)!r}] is {brief(value)}, not {said}",
                                    "PEFT needs a positive rank and a non-negative alpha per pattern")
            try:
                compile_key(pattern)
            except PatternError as e:
                raise _config_error(cfg_path, f"{key} key {shorten(pattern, 60)!r} is not a valid regular "
                                    f"expression ({e.reason})", "PEFT matches each key as a regex suffix of "
                                    "module names") from None
    tokens = cfg.get("alora_invocation_tokens")
    if tokens is not None and not all(is_int(t) and 0 <= t < 2**32 for t in tokens):
        raise _config_error(cfg_path, f"alora_invocation_tokens is {brief(tokens)}, not a list of token ids")
    layers = cfg.get("layer_replication")
    if layers is not None and not all(isinstance(x, list) and len(x) == 2 and all(is_int(i) for i in x)
                                      for x in layers):
        raise _config_error(cfg_path, f"layer_replication is {brief(layers)}, not a list of [start, end] pairs")
    return cfg


def _pattern_values(adapter_path: Path, cfg: dict[str, Any], key: str, modules: list[str]) -> dict[str, Any]:
    """module -> its value from rank_pattern / alpha_pattern under PEFT's rule, or the config's default."""
    patterns = cfg.get(key) or {}
    default = cfg["r" if key == "rank_pattern" else "lora_alpha"]
    if not patterns:
        return dict.fromkeys(modules, default)
    try:
        chosen = first_keys(list(patterns), modules)
    except PatternError as e:
        raise AdapterError(f"{adapter_path / CONFIG}: {key} key {shorten(e.pattern, 60)!r} cannot be used "
                           f"({e.reason})", "PEFT matches each key as a regular expression against every module "
                           "name", "simplify the key (a module name suffix such as layers.1.mlp.down_proj)") from None
    return {m: default if chosen[m] is None else patterns[chosen[m]] for m in modules}


def _open_weights(path: Path):
    st, pt = path / SAFETENSORS, path / PICKLE
    if st.is_file():
        reader = SafetensorsFile(st)
        return st, reader, {k: (e.shape, e.dtype) for k, e in reader.entries.items()}
    if pt.is_file():
        return _open_pickle(pt)
    raise InputError(f"{path} has no {SAFETENSORS} or {PICKLE}", "the adapter's weights are missing",
                     "copy the whole folder written by model.save_pretrained()")


# torch.save(..., _use_new_zipfile_serialization=False): pickle protocol 2 and torch's magic number first
_LEGACY_TORCH = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _open_pickle(pt: Path):
    """adapter_model.bin in torch's zip format, read with the weights-only unpickler and memory-mapped."""
    try:
        with open(pt, "rb") as f:
            head = f.read(len(_LEGACY_TORCH))
    except OSError as e:
        raise InputError(f"{pt} cannot be read ({e.strerror or e})", "", "check its permissions") from None
    if head == _LEGACY_TORCH:
        raise InputError(f"{pt} is in PyTorch's legacy (non-zip) format",
                         "gguf-lora reads .bin adapters only in the zip format torch.save writes since PyTorch 1.6, "
                         "which it memory-maps and unpickles weights-only",
                         "re-save the adapter as safetensors (save_pretrained(..., safe_serialization=True))")
    if head[:1] == b"\x80":
        raise InputError(f"{pt} cannot be loaded safely (it is a bare pickle, not a file torch.save wrote)",
                         "a pickle can run code when it is read, so gguf-lora reads only torch.save's zip format, "
                         "weights only", "re-save the adapter as safetensors (safe_serialization=True)")
    if head[:4] != b"PK\x03\x04":
        shown = "it is empty" if not head else f"it starts with {head[:4]!r}"
        raise InputError(f"{pt} is not a PyTorch file ({shown})", "the file is damaged or of another format",
                         "copy the adapter again, or re-save it as safetensors")
    import torch

    try:
        sd = torch.load(pt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch's own parser on untrusted bytes: any failure means an unusable file
        text = str(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        raise InputError(f"{pt} cannot be loaded safely ({shorten(first, 200)})",
                         "only plain tensors are read from a pickle; anything else (code, custom classes) "
                         "is refused", "re-save the adapter as safetensors (safe_serialization=True)") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise InputError(f"{pt} does not hold a flat dict of named tensors", "", "re-save the adapter as safetensors")
    for k, v in sd.items():
        if v.layout != torch.strided or v.is_quantized or v.is_complex() or len(k) > MAX_NAME:
            raise InputError(f"{pt}: tensor {shorten(k)!r} is not a plain real tensor with a usable name",
                             f"it is {v.dtype}, layout {v.layout}" if len(k) <= MAX_NAME else
                             f"its name has {len(k)} characters", "re-save the adapter as safetensors")
    return pt, sd, {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sd.items()}


def load_adapter(path: str | Path) -> PeftAdapter:
    """Open a PEFT LoRA folder: config checked, tensors indexed (not read), ranks and scales resolved."""
    path = usable_path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist", "", "pass the folder written by model.save_pretrained()")
    if not path.is_dir():
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError:
            magic = b""
        if magic == b"GGUF":
            raise InputError(f"{path} is a GGUF file, not a PEFT adapter folder",
                             "convert reads PEFT adapters (adapter_config.json + weights)",
                             "to look at a GGUF use 'gguf-lora inspect'; pass it as --base if it is the base model")
        said = "an empty file" if path.is_file() and path.stat().st_size == 0 else "a file"
        raise InputError(f"{path} is {said}, not a PEFT adapter folder", "",
                         "pass the folder that holds adapter_config.json")
    cfg = _load_config(path)
    weights_file, reader, index = _open_weights(path)

    halves: dict[str, dict[str, str]] = {}
    others: list[str] = []
    base_copies: dict[str, str] = {}
    for key in index:
        copy = _BASE_COPY.match(key)
        if copy and "modules_to_save" not in key:
            base_copies[copy.group("module")] = key
            continue
        m = _PAIR.match(key)
        if not m or key.endswith(".bias") or (m.group("adapter") and m.group("adapter") == "bias"):
            others.append(key)
            continue
        module = m.group("module")
        for p in _PREFIXES:
            module = module.removeprefix(p)
        slot = halves.setdefault(module, {})
        slot["emb"] = bool(m.group("emb"))
        slot[m.group("ab")] = key

    targets = cfg.get("target_parameters") or []
    targets = [str(t) for t in targets] if isinstance(targets, list) else []  # PEFT saves a list
    ranks = _pattern_values(path, cfg, "rank_pattern", sorted(halves))  # every key checked, matched in bounded time
    alphas = _pattern_values(path, cfg, "alpha_pattern", sorted(halves))
    pairs: dict[str, LoraPair] = {}
    for module, slot in sorted(halves.items()):
        if "A" not in slot or "B" not in slot:
            raise AdapterError(f"{weights_file}: module {module} has lora_{'A' if 'A' in slot else 'B'} "
                               f"but no lora_{'B' if 'A' in slot else 'A'}", "the file is incomplete",
                               "re-save the adapter")
        (a_shape, a_dtype), (b_shape, _) = index[slot["A"]], index[slot["B"]]
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise UnsupportedError(f"Module {module} has LoRA weights of shapes {a_shape} and {b_shape}",
                                   "only Linear and Embedding LoRA exist in GGUF (no convolutions)",
                                   "target Linear modules only")
        rank = a_shape[0]
        if b_shape[1] != rank:
            raise AdapterError(f"Module {module}: lora_A {a_shape} and lora_B {b_shape} disagree on the rank",
                               "the file is inconsistent", "re-save the adapter")
        pair = LoraPair(module, slot["emb"], slot["A"], slot["B"], a_shape, b_shape, a_dtype, rank, 0.0, 0.0)
        pair.params = _wrapped_params(pair.unwrapped, targets)
        if pair.wrapper:
            pairs[module] = _param_wrapper(cfg, pair)
            continue
        r_cfg, alpha = int(ranks[module]), float(alphas[module])
        if r_cfg != rank:
            raise AdapterError(f"Module {module} has rank {rank} in its weights but {r_cfg} in {CONFIG}",
                               "the config does not describe these weights, so PEFT's scale would be unknown",
                               "use the adapter_config.json saved with these weights")
        pair.alpha, pair.scale = alpha, peft_scale(rank, alpha, bool(cfg.get("use_rslora")))
        pairs[module] = pair
    if not pairs and not others and not base_copies:
        raise AdapterError(f"{weights_file} holds no tensors", "", "re-save the adapter")
    return PeftAdapter(path, cfg, weights_file, pairs, others, base_copies, reader)


def _wrapped_params(module: str, targets: list[str]) -> tuple[str, ...]:
    """The parameters of `module` that target_parameters names (PEFT's rule: the key module.param equals a
    target or ends with '.' + target)."""
    out = []
    for target in targets:
        param = target.rpartition(".")[2]
        key = f"{module}.{param}"
        if (key == target or key.endswith("." + target)) and param not in out:
            out.append(param)
    return tuple(out)


def _param_wrapper(cfg: dict[str, Any], pair: LoraPair) -> LoraPair:
    """A ParamWrapper's rank and expert count as far as the config tells: lora_A stacks experts * rank rows,
    so the configured rank (of any parameter the wrapper may adapt) must divide them."""
    rows = pair.a_shape[0]
    keys = [f"{pair.unwrapped}.{p}" for p in pair.params] or [pair.unwrapped]
    options = sorted({_rank_alpha(cfg, k) for k in keys})
    fitting = [(r, a) for r, a in options if r > 0 and rows % r == 0]
    if not fitting:
        raise AdapterError(f"Module {pair.module} has {rows} rows in lora_A, not a multiple of its rank "
                           f"{' or '.join(str(r) for r, _ in options)} in {CONFIG}",
                           "the config does not describe these weights", "use the adapter_config.json saved with them")
    rank, alpha = fitting[0]
    scale = peft_scale(rank, alpha, bool(cfg.get("use_rslora")))
    pair.rank, pair.alpha, pair.scale, pair.experts = rank, alpha, scale, rows // rank
    return pair
