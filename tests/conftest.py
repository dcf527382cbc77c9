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


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory):
    """A tiny llama that takes any text (byte-fallback tokenizer, ChatML template), its GGUF written by
    llama.cpp's converter, and two GGUF LoRA adapters for it: adapters/sql.gguf and adapters/poem.gguf."""
    import tiny
    from llamacpp import hf_to_gguf

    from gguf_lora import convert

    root = tmp_path_factory.mktemp("chat_model")
    tiny.make_chat_base("llama", root / "hf")
    base = hf_to_gguf(root / "hf", root / "base.gguf")
    (root / "adapters").mkdir()
    for name, seed in (("sql", 1), ("poem", 2)):
        peft_folder = tiny.make_adapter(root / "hf", root / "peft" / name, seed=seed)
        convert(peft_folder, base, root / "adapters" / f"{name}.gguf")
    return base, root / "adapters"


def pytest_terminal_summary(terminalreporter):
    """The fuzz suite's tally: how many generated cases ran per property, and what they found."""
    support = sys.modules.get("fuzz_support")
    lines = support.summary() if support else []
    if lines:
        terminalreporter.section("fuzz cases")
        for line in lines:
            terminalreporter.write_line(line)
        report = os.environ.get("GGUF_LORA_FUZZ_REPORT")
        if report:
            Path(report).write_text("\n".join(lines) + "\n")
