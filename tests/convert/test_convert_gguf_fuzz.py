"""Property test: any truncation or byte mutation of a valid GGUF gives our clear error
(a ``ConversionError``, a ``ValueError`` subclass) or a valid parse, never another exception
type and never a hang."""

from __future__ import annotations

import functools
import re
import struct
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llama_numpy_ref import TINY_HF_CONFIG, random_weights, write_gguf

from user_llm.convert import gguf as gguf_lib
from user_llm.convert.common import ConversionError
from user_llm.vocabularies import BPETokenizer, TokenizerError

_EXTREMES = [0, 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63, 2**64 - 1]


@functools.cache
def _base() -> tuple[bytes, int]:
    """A small valid GGUF (2 layers, tokenizer included) and where its tensor data start."""
    cfg = dict(TINY_HF_CONFIG, num_hidden_layers=1)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "base.gguf"
        write_gguf(path, cfg, random_weights(cfg), qtype="Q8_0")
        data = path.read_bytes()
        f = gguf_lib.GGUFFile(path)
        data_start = min(t.offset for t in f.tensors.values())
    return data, data_start


def _check(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.gguf"
        path.write_bytes(data)
        try:
            f = gguf_lib.GGUFFile(path)
        except ConversionError:
            return
        for info in f.tensors.values():
            assert info.offset + info.nbytes <= len(data)
        try:
            cfg, params, meta = gguf_lib.load_gguf(path)
        except ConversionError:
            pass
        else:
            assert params["token_embedder"]["embedding"].shape == (cfg.vocab_size, cfg.embed_dim)
            assert np.isfinite(params["final_norm"]["scale"]).all()
        try:
            tok = BPETokenizer.from_gguf_metadata(f.metadata)
        except TokenizerError:
            return
        tok.decode(tok.encode("hello <|im_end|> world"))


@settings(
    max_examples=400,
    deadline=timedelta(seconds=3),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
@given(data=st.data())
def test_mutated_or_truncated_gguf_fails_cleanly(data):
    base, header_end = _base()
    buf = bytearray(base)
    kind = data.draw(st.sampled_from(["bytes", "u64", "truncate", "mixed"]))
    if kind in ("bytes", "mixed"):
        for pos, val in data.draw(
            st.lists(
                st.tuples(st.integers(0, header_end - 1), st.integers(0, 255)),
                min_size=1,
                max_size=6,
            )
        ):
            buf[pos] = val
    if kind in ("u64", "mixed"):
        pos = data.draw(st.integers(4, header_end - 8))
        val = data.draw(st.sampled_from(_EXTREMES) | st.integers(0, 2**64 - 1))
        buf[pos : pos + 8] = struct.pack("<Q", val)
    if kind in ("truncate", "mixed"):
        cut = data.draw(st.integers(0, len(buf)))
        buf = buf[:cut]
    _check(bytes(buf))


def test_base_file_parses():
    base, _ = _base()
    _check(base)


def test_overlapping_tensors_are_refused(tmp_path):
    """Two tensors pointing at the same bytes: the second tensor's offset field is set to
    the first's (a crafted file that parses otherwise)."""
    data, data_start = _base()
    path = tmp_path / "base.gguf"
    path.write_bytes(data)
    infos = sorted(gguf_lib.GGUFFile(path).tensors.values(), key=lambda t: t.offset)
    first, second = infos[0], infos[1]
    name = second.name.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    offset_at = at + 4 + 8 * n_dims + 4
    assert struct.unpack_from("<Q", data, offset_at)[0] == second.offset - data_start
    crafted = bytearray(data)
    struct.pack_into("<Q", crafted, offset_at, first.offset - data_start)
    path.write_bytes(bytes(crafted))
    a, b = re.escape(first.name), re.escape(second.name)
    with pytest.raises(ConversionError, match=f"tensors ({a} and {b}|{b} and {a}) overlap"):
        gguf_lib.GGUFFile(path)
