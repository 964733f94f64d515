"""The byte-level BPE vocabulary built from the packaged SmolLM2 GGUF, against the reference
tokenizer's ids on 1,187 strings, plus the ChatML template and the SeqIO/TF wrapper."""

from __future__ import annotations

import json
import pickle

import pytest
from conftest import SHARED_REFERENCE, run_module

CASES = SHARED_REFERENCE / "smollm2_tokenizer_cases.json"


@pytest.fixture(scope="module")
def gguf_path():
    from user_llm.import_checkpoint import packaged_gguf

    try:
        return packaged_gguf()
    except ValueError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def tok(gguf_path):
    from user_llm.vocabularies import BPETokenizer

    return BPETokenizer.from_path(gguf_path)


@pytest.mark.slow
def test_ids_match_reference_on_all_cases(tok):
    cases = json.loads(CASES.read_text())["cases"]
    assert len(cases) == 1187
    got = tok.encode_batch([c["text"] for c in cases])
    bad = [(c["text"], c["ids"], g) for c, g in zip(cases, got, strict=True) if g != c["ids"]]
    assert not bad, f"{len(bad)} mismatches, e.g. {bad[:3]}"
    # Byte-level BPE is lossless.
    for c in cases:
        assert tok.decode(c["ids"]) == c["text"]


def test_special_ids_and_metadata(tok):
    assert tok.vocab_size == 49152
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 2, 0)
    assert tok.add_bos is False
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    assert tok.decode([1, 4093, 2], skip_special_tokens=True) == "user"


def test_chat_template_is_smollm2_chatml(tok):
    reference = json.loads((SHARED_REFERENCE / "smollm2_reference.json").read_text())
    chat_case = reference["cases"][7]["prompt"]
    system = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n"
    )
    msgs = [{"role": "user", "content": "Recommend a movie."}]
    assert tok.apply_chat_template(msgs) == system + chat_case
    assert tok.apply_chat_template(msgs, system_prompt="Be brief.").startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    )
    with_system = [{"role": "system", "content": "S"}, *msgs]
    assert tok.apply_chat_template(with_system, add_generation_prompt=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nRecommend a movie.<|im_end|>\n"
    )


def test_save_and_load_round_trip(tok, tmp_path):
    from user_llm.vocabularies import BPETokenizer

    spec = tok.save(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"tokenizer": spec}))
    again = BPETokenizer.from_path(tmp_path)
    assert again.fingerprint == tok.fingerprint
    text = "Toy Story (1995) 🎬 — naïve café <|im_end|>"
    assert again.encode(text) == tok.encode(text)


def test_model_code_does_not_import_tensorflow():
    code = (
        "import sys, user_llm.vocabularies, user_llm.generate, user_llm.import_checkpoint\n"
        "assert 'tensorflow' not in sys.modules and 'seqio' not in sys.modules\n"
    )
    run_module(["-c", code])


@pytest.mark.slow
def test_seqio_vocabulary(gguf_path, tok):
    import numpy as np
    import seqio
    import tensorflow as tf

    from user_llm.data.bpe_vocabulary import ByteLevelBPEVocabulary

    vocab = ByteLevelBPEVocabulary(str(gguf_path))
    assert isinstance(vocab, seqio.Vocabulary)
    assert (vocab.vocab_size, vocab.eos_id, vocab.bos_id, vocab.pad_id) == (49152, 2, 1, 0)
    text = "My favorite movies are Toy Story (1995)"
    ids = tok.encode(text)
    assert vocab.encode(text) == ids
    assert vocab.decode(ids + [2, 500, 600]) == text  # stops at EOS, which is not rendered
    assert vocab.decode([0, 0] + ids) == text  # pad ids dropped

    assert vocab.encode_tf(tf.constant(text)).numpy().tolist() == ids
    ragged = vocab.encode_tf(tf.constant([text, "hi"]))
    assert ragged.to_list() == [ids, tok.encode("hi")]
    assert vocab.decode_tf(tf.constant(ids)).numpy().decode() == text
    batch = tf.constant(np.array([ids, ids[:3] + [0] * (len(ids) - 3)], np.int32))
    decoded = [s.decode() for s in vocab.decode_tf(batch).numpy()]
    assert decoded == [text, tok.decode(ids[:3])]

    # Inside a tf.data pipeline (graph mode), as SeqIO's tokenize preprocessor uses it.
    ds = tf.data.Dataset.from_tensor_slices([text, "hello world"]).map(vocab.encode_tf)
    assert [x.numpy().tolist() for x in ds] == [ids, tok.encode("hello world")]

    clone = pickle.loads(pickle.dumps(vocab))
    assert clone == vocab and clone.encode(text) == ids


@pytest.mark.parametrize("text,message", [("{bad", "invalid JSON"), ("[1]", "not a JSON object")])
def test_malformed_tokenizer_config_is_a_tokenizer_error(tmp_path, text, message):
    from user_llm.vocabularies import BPETokenizer, TokenizerError

    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text(text)
    with pytest.raises(TokenizerError, match=f"tokenizer_config.json: {message}"):
        BPETokenizer.from_hf_dir(tmp_path)


def test_chat_template_is_rendered_by_jinja_whatever_its_format(tok):
    """Any model's Jinja template renders (not ChatML only); no template falls back to ChatML;
    a template that refuses the chat, or is not Jinja, is a clear error."""
    import copy

    from user_llm.vocabularies import TokenizerError

    msgs = [{"role": "user", "content": "Hi"}]
    other = copy.copy(tok)
    other.chat_template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}"
    )
    assert other.apply_chat_template(msgs) == "<|im_start|>[USER] Hi\n[ASSISTANT]"
    other.chat_template = None
    assert other.apply_chat_template(msgs, system_prompt="S") == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    other.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(TokenizerError, match="roles must alternate"):
        other.apply_chat_template(msgs)
    other.chat_template = "{% for m in messages %}"
    with pytest.raises(TokenizerError, match="not valid Jinja"):
        other.apply_chat_template(msgs)
    with pytest.raises(TokenizerError, match="needs 'role' and 'content'"):
        tok.apply_chat_template([{"content": "no role"}])
