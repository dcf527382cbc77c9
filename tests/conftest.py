import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory):
    """A tiny llama HF folder and its GGUF written by llama.cpp's converter (shared by unit tests)."""
    import tiny
    from llamacpp import hf_to_gguf

    root = tmp_path_factory.mktemp("llama_base")
    tiny.make_base("llama", root / "hf")
    return root / "hf", hf_to_gguf(root / "hf", root / "base.gguf")
