"""Our fast GGUF reader returns what gguf-py's GGUFReader returns, on files llama.cpp's tools wrote."""
from __future__ import annotations

import gguf
import numpy as np

import tiny
from gguf_lora import convert
from gguf_lora.gguf_read import GGUFFile
from llamacpp import hf_to_gguf, llama_quantize


def same_as_gguf_py(path):
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(ours.fields) == keys
    for k in keys:
        assert ours.fields[k].types == ref.fields[k].types, k
        assert ours.fields[k].contents() == ref.fields[k].contents(), k
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert (a.tensor_type, a.n_bytes, a.data_offset, a.shape.tolist()) == \
               (b.tensor_type, b.n_bytes, b.data_offset, b.shape.tolist()), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(np.asarray(a.data).view(np.uint8), np.asarray(b.data).view(np.uint8)), a.name


def test_reader_matches_gguf_py(llama_base, tmp_path):
    hf, base = llama_base
    same_as_gguf_py(base)
    same_as_gguf_py(llama_quantize(base, tmp_path / "q.gguf", "q4_0"))
    same_as_gguf_py(convert(tiny.make_adapter(hf, tmp_path / "a", r=4), base, tmp_path / "a.gguf").output)
    wide = tiny.make_base("phi3", tmp_path / "phi3", hidden_size=256, intermediate_size=512)
    assert wide is not None
    k = llama_quantize(hf_to_gguf(tmp_path / "phi3", tmp_path / "phi3.gguf", "f16"), tmp_path / "k.gguf", "q4_k_m")
    same_as_gguf_py(k)
