"""Describe a GGUF (adapter or model) or a PEFT folder, and whether an adapter fits a base."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf

from .base import is_gguf, load_base
from .gguf_read import GGUFFile
from .errors import GgufLoraError, InputError, printable
from .mapping import pair_rank, plan, resolve_base, target_shape
from .peft import PeftAdapter, load_adapter
from .validate import usable_path


def _gguf_report(path: Path) -> dict[str, Any]:
    reader = GGUFFile(path)  # damaged or truncated: a GGUFError naming the file and the place
    meta: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = f.contents()
        if isinstance(value, list) and len(value) > 8:
            value = f"[{len(value)} items]"
        elif isinstance(value, str) and len(value) > 200:
            value = value[:200] + "…"
        meta[key] = value
    tensors = [{"name": t.name, "type": t.tensor_type.name, "shape": [int(d) for d in reversed(t.shape.tolist())]}
               for t in reader.tensors]
    report: dict[str, Any] = {"path": str(path), "kind": "gguf-" + ("adapter" if meta.get("general.type") == "adapter"
                                                                    else "model"),
                              "arch": meta.get("general.architecture"), "metadata": meta, "tensors": tensors}
    file_type = meta.get("general.file_type")
    if isinstance(file_type, int):
        try:
            report["file_type"] = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    if report["kind"] == "gguf-adapter":
        alpha = float(reader.get("adapter.lora.alpha", "float", 0.0))
        shapes = {t["name"]: t["shape"] for t in tensors}
        # gguf-lora convert records PEFT's scale of each pair (it folded scale / (alpha / rank) into lora_b)
        recorded = dict(zip(reader.get("gguf_lora.peft_scale_tensors", "strs", []),
                            reader.get("gguf_lora.peft_scales", "floats", [])))
        report["pairs"] = []
        for name, shape in shapes.items():
            if not name.endswith(".lora_b") or len(shape) not in (2, 3):
                continue
            tensor, runtime = name[: -len(".lora_b")], alpha / shape[-1] if alpha and shape[-1] else 1.0
            scale = float(recorded.get(tensor, runtime))
            if scale != scale:  # NaN: modules of different scales share this pair (fused q/k/v), each folded
                scale = None
            report["pairs"].append({"tensor": tensor, "rank": shape[-1], "experts": shape[0] if len(shape) == 3 else 0,
                                    "scale": scale, "runtime_scale": runtime,
                                    "folded": None if scale is None else scale / runtime if runtime else 1.0})
    return report


def _peft_report(adapter: PeftAdapter) -> dict[str, Any]:
    path = adapter.path
    cfg = adapter.config
    return {
        "path": str(path), "kind": "peft", "peft_type": cfg.get("peft_type"), "r": cfg.get("r"),
        "lora_alpha": cfg.get("lora_alpha"), "use_rslora": bool(cfg.get("use_rslora")),
        "rank_pattern": cfg.get("rank_pattern") or {}, "alpha_pattern": cfg.get("alpha_pattern") or {},
        "base_model_name_or_path": cfg.get("base_model_name_or_path"), "weights": str(adapter.weights_file),
        "pairs": [{"module": p.module, "rank": p.rank, "alpha": p.alpha, "scale": p.scale, "dtype": p.dtype,
                   "embedding": p.embedding, "experts": p.experts if p.stacked else 0,
                   "parameters": list(p.params)} for p in adapter.pairs.values()],
        "unsupported": [{"feature": f, "tensors": names[:5]} for f, names in adapter.unsupported_features()],
    }


def _fit_gguf_adapter(report: dict[str, Any], base_path: Path) -> str | None:
    base = load_base(base_path)
    if base.arch.name != report["arch"]:
        return f"architecture {report['arch']} does not match the base's {base.arch.name}"
    shapes = {t["name"]: t["shape"] for t in report["tensors"]}
    for pair in report["pairs"]:
        name = pair["tensor"]
        if base.tensors is None:
            break
        if name not in base.tensors:
            return f"{name} does not exist in the base"
        a, b = shapes.get(name + ".lora_a"), shapes[name + ".lora_b"]
        if a is None or pair_rank(name, tuple(a), tuple(b)) is None:
            return f"{name} has lora_a {a} and lora_b {b}, not a LoRA pair that shares its rank"
        got = target_shape(name, tuple(a), tuple(b))
        if tuple(base.tensors[name]) != tuple(got):
            if len(got) == 3 and got[0] != base.tensors[name][0]:
                return (f"{name} has {a[0]} experts in lora_a and {b[0]} in lora_b but {base.tensors[name][0]} in the "
                        "base (llama.cpp does not check this: an out-of-bounds write at run time)")
            return f"{name} has shape {got} in the adapter but {tuple(base.tensors[name])} in the base"
        if name == "token_embd.weight" and base.tied_embeddings:
            return "the base ties output to token_embd, so llama.cpp would misapply the embedding LoRA"
    return None


def inspect(path: str | Path, base: str | Path | None = None) -> dict[str, Any]:
    path = usable_path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist", "", "pass a GGUF file or a PEFT adapter folder")
    if path.is_file() and not is_gguf(path):
        size = path.stat().st_size
        said = "is empty" if size == 0 else f"is a file of {size:,} bytes that does not start with the GGUF magic"
        raise InputError(f"{path} {said}", "gguf-lora inspect reads GGUF files and PEFT adapter folders",
                         "pass a complete .gguf (download or convert it again) or the folder that holds "
                         "adapter_config.json")
    adapter = None if path.is_file() else load_adapter(path)
    report = _gguf_report(path) if adapter is None else _peft_report(adapter)
    if base is not None:
        usable_path(base, "Base ")
        if report["kind"] == "gguf-model":
            raise InputError(f"{path} is a model, not an adapter", "--base checks an adapter against a model", "")
        if adapter is not None:
            try:
                plan(adapter, resolve_base(adapter, base))
                problem = None
            except GgufLoraError as e:
                problem = str(e)
        else:
            problem = _fit_gguf_adapter(report, Path(base))
        report["base"] = str(base)
        report["fits"] = problem is None
        report["problem"] = problem
    return report


def render(report: dict[str, Any]) -> str:
    lines = [f"{printable(report['path'])}: {report['kind']}"
             + (f", arch {report['arch']}" if report.get("arch") else "")]
    if report["kind"] == "peft":
        lines.append(f"  r={report['r']} lora_alpha={report['lora_alpha']} rslora={report['use_rslora']} "
                     f"base={report['base_model_name_or_path']}")
        for p in report["pairs"]:
            experts = f"  {p['experts']} experts x" if p["experts"] else ""
            params = f"  ({' or '.join(p['parameters'])})" if p["parameters"] else ""
            lines.append(f"  {p['module']:<50}{experts} rank {p['rank']:>4}  alpha {p['alpha']:g}  scale {p['scale']:.6g}"
                         f"  {p['dtype']}{'  (embedding)' if p['embedding'] else ''}{params}")
        for u in report["unsupported"]:
            lines.append(f"  ! {u['feature']}: {', '.join(u['tensors'])}")
    else:
        for key, value in report["metadata"].items():
            named = f" ({report['file_type']})" if key == "general.file_type" and "file_type" in report else ""
            lines.append(f"  {key} = {value}{named}")
        pairs = report.get("pairs")
        types = {t["name"]: t["type"] for t in report["tensors"]}
        for t in [] if pairs else report["tensors"]:  # an adapter's tensors are listed as pairs
            lines.append(f"  {t['name']:<50} {t['type']:<6} {t['shape']}")
        folded = [p for p in pairs or [] if p["folded"] is None or abs(p["folded"] - 1.0) > 1e-6]
        if folded:
            lines.append(f"  PEFT's scale is folded into lora_b where it is not alpha / rank ({len(folded)} of "
                         f"{len(pairs)} pairs): llama.cpp applies alpha / rank, the fold makes up the rest")
        for p in pairs or []:
            experts = f"  {p['experts']} experts x" if p["experts"] else ""
            if p["scale"] is None:
                scale, how = "per fused module", f" (alpha / rank {p['runtime_scale']:.6g} x each module's own fold)"
            else:
                scale = f"{p['scale']:.6g}"
                how = f" (alpha / rank {p['runtime_scale']:.6g} x {p['folded']:.6g} folded)" if p in folded else ""
            lines.append(f"  pair {p['tensor']:<45}{experts} rank {p['rank']:>4}  {types[p['tensor'] + '.lora_b']:<5} "
                         f"scale {scale}{how}")
    if "fits" in report:
        lines.append(f"fits {printable(report['base'])}: " + ("yes" if report["fits"] else f"no: {report['problem']}"))
    return "\n".join(lines)
