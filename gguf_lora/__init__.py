"""gguf-lora: PEFT LoRA adapters to llama.cpp / Ollama, exactly.

The public names below are imported on first use (module __getattr__), so `import gguf_lora` and the
commands that touch no tensors (`gguf-lora adapters use`, `--help`) do not pay for numpy, gguf, requests
or rich."""
from __future__ import annotations

import sys
import types
from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "convert": ".convert", "ConvertResult": ".convert",
    "merge": ".merge", "quantize": ".merge", "MergeResult": ".merge",
    "GgufLoraError": ".errors", "InputError": ".errors", "AdapterError": ".errors", "UnsupportedError": ".errors",
    "BaseMismatchError": ".errors", "OutputError": ".errors", "ServerError": ".errors",
    "LlamaServer": ".runtime.llama_server", "ManagedServer": ".runtime.llama_server",
    "Ollama": ".runtime.ollama",
}
__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on demand
    from .convert import ConvertResult, convert
    from .errors import (AdapterError, BaseMismatchError, GgufLoraError, InputError, OutputError, ServerError,
                         UnsupportedError)
    from .merge import MergeResult, merge, quantize
    from .runtime.llama_server import LlamaServer, ManagedServer
    from .runtime.ollama import Ollama


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gguf_lora' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        """Importing the submodule gguf_lora.merge (or .convert) sets the package attribute of that name:
        keep gguf_lora.merge the function, as the eager imports used to leave it."""
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
