"""``ByteLevelBPEVocabulary``: a ``seqio.Vocabulary`` around ``vocabularies.BPETokenizer``.

The data pipeline's side of the tokenizer: SeqIO's preprocessors and feature converters call it,
with the TF variants they need (through ``tf.py_function``). It lives here, not in
``user_llm.vocabularies``, because SeqIO imports TensorFlow, which model and decoding code never
do.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import seqio
from tokenizers import Tokenizer

from user_llm.vocabularies import BPETokenizer


class ByteLevelBPEVocabulary(seqio.Vocabulary):
    """SeqIO vocabulary over a ``BPETokenizer``.

    ``path``: a ``.gguf`` file, a ``tokenizer.json``, a HF folder or an imported
    checkpoint directory (gin-friendly). SeqIO's feature converters pad with id 0, so
    ``pad_id`` is 0 here (SmolLM2's ``<|endoftext|>``, never produced by ``encode`` of
    ordinary text); ``decode`` stops at the first EOS and drops pad ids and the EOS, as
    SeqIO's SentencePiece vocabularies do.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        tokenizer: BPETokenizer | None = None,
        extra_ids: int = 0,
    ) -> None:
        if (path is None) == (tokenizer is None):
            raise ValueError("give exactly one of path or tokenizer")
        self._path = None if path is None else str(path)
        self.tokenizer = tokenizer if tokenizer is not None else BPETokenizer.from_path(path)
        super().__init__(extra_ids=extra_ids)

    def __reduce__(self):  # pickles by the tokenizer definition, not by a file path
        return (_rebuild_vocabulary, (self.tokenizer.tokenizer.to_str(), self._spec()))

    def _spec(self) -> dict[str, Any]:
        t = self.tokenizer
        return {
            "bos_id": t.bos_id,
            "eos_id": t.eos_id,
            "pad_id": t.pad_id,
            "unk_id": t.unk_id,
            "chat_template": t.chat_template,
            "add_bos": t.add_bos,
            "extra_ids": self.extra_ids,
        }

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_id

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_id

    @property
    def unk_id(self) -> int | None:
        return self.tokenizer.unk_id

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def _base_vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _encode(self, s: str) -> list[int]:
        return self.tokenizer.encode(s)

    def _decode(self, ids: Iterable[int]) -> str:
        # Like SeqIO's SentencePiece vocabularies, the text holds neither padding nor EOS.
        drop = {self.pad_id, self.eos_id}
        return self.tokenizer.decode([int(i) for i in ids if int(i) not in drop])

    def _encode_tf(self, s: Any) -> Any:
        import tensorflow as tf

        def encode_one(x: Any) -> Any:
            return tf.constant(self._encode(x.numpy().decode("utf-8")), tf.int32)

        s = tf.convert_to_tensor(s, tf.string)
        if s.shape.rank == 0:
            out = tf.py_function(encode_one, [s], tf.int32)
            out.set_shape([None])
            return out
        if s.shape.rank == 1:

            def encode_many(x: Any) -> Any:
                rows = [self._encode(t.decode("utf-8")) for t in x.numpy()]
                flat = [i for row in rows for i in row]
                lengths = [len(row) for row in rows]
                return tf.constant(flat, tf.int32), tf.constant(lengths, tf.int64)

            values, lengths = tf.py_function(encode_many, [s], [tf.int32, tf.int64])
            values.set_shape([None])
            lengths.set_shape([None])
            return tf.RaggedTensor.from_row_lengths(values, lengths)
        raise ValueError(f"encode_tf takes a scalar or 1-D string tensor, got rank {s.shape}")

    def _decode_tf(self, ids: Any) -> Any:
        import tensorflow as tf

        ids = tf.convert_to_tensor(ids)

        def decode_all(x: Any) -> Any:
            arr = x.numpy()
            if arr.ndim == 1:
                return tf.constant(self._decode(arr.tolist()).encode("utf-8"))
            flat = arr.reshape(-1, arr.shape[-1])
            texts = [self._decode(row.tolist()).encode("utf-8") for row in flat]
            return tf.reshape(tf.constant(texts, tf.string), arr.shape[:-1])

        out = tf.py_function(decode_all, [ids], tf.string)
        out.set_shape(ids.shape[:-1])
        return out

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ByteLevelBPEVocabulary)
            and self.extra_ids == other.extra_ids
            and self.tokenizer.fingerprint == other.tokenizer.fingerprint
        )

    def __hash__(self) -> int:
        return hash(self.tokenizer.fingerprint)

    def __repr__(self) -> str:
        return f"ByteLevelBPEVocabulary(size={self.vocab_size}, path={self._path!r})"


def _rebuild_vocabulary(tokenizer_json: str, spec: dict[str, Any]) -> ByteLevelBPEVocabulary:
    spec = dict(spec)
    extra_ids = spec.pop("extra_ids", 0)
    tok = BPETokenizer(Tokenizer.from_str(tokenizer_json), **spec)
    return ByteLevelBPEVocabulary(tokenizer=tok, extra_ids=extra_ids)
