"""gguf-lora: PEFT LoRA adapters to llama.cpp / Ollama, exactly."""
__version__ = "0.1.0"

from .convert import ConvertResult, convert  # noqa: E402
from .merge import MergeResult, merge, quantize  # noqa: E402
from .errors import (AdapterError, BaseMismatchError, GgufLoraError, InputError, OutputError,  # noqa: E402
                     ServerError, UnsupportedError)
from .runtime.llama_server import LlamaServer, ManagedServer  # noqa: E402
from .runtime.ollama import Ollama  # noqa: E402

__all__ = ["convert", "ConvertResult", "merge", "quantize", "MergeResult", "GgufLoraError", "InputError", "AdapterError", "UnsupportedError",
           "BaseMismatchError", "OutputError", "ServerError", "LlamaServer", "ManagedServer", "Ollama", "__version__"]
