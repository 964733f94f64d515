"""Byte-level BPE vocabularies of real LLMs (SmolLM2, Llama 3, Qwen2 style), usable by SeqIO.

Plain Python, so that model code and the ``generate`` CLI never import TensorFlow:

- ``BPETokenizer``: plain Python over the ``tokenizers`` library. Built from a GGUF's
  ``tokenizer.ggml.*`` metadata, from a Hugging Face ``tokenizer.json``, or from the
  ``tokenizer.json`` an imported checkpoint directory carries. Encodes/decodes, knows the special
  ids and renders ChatML chat prompts.

The ``seqio.Vocabulary`` around a ``BPETokenizer`` lives on the data side
(``user_llm/data/bpe_vocabulary.py``): SeqIO imports TensorFlow.

Why the ``tokenizers`` library: it is the reference implementation of byte-level BPE (merge
ranks, byte-to-unicode table, added special tokens), so ids match Hugging Face's exactly. For a
GGUF we rebuild the pipeline the way Hugging Face's GGUF loader does; for SmolLM2 this is the
GPT-2 pre-tokenizer regex (checked on 1,187 strings in ``tests/test_vocabularies.py``).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from absl import logging

TOKENIZER_FILE = "tokenizer.json"

# Pre-tokenizer regexes by llama.cpp's ``tokenizer.ggml.pre`` name. ``None``: Hugging Face's
# ByteLevel(use_regex=True), i.e. the GPT-2 regex, which is what Hugging Face's GGUF loader uses
# for these (the golden SmolLM2 ids in shared/reference were produced that way).
_GPT2_PRE = None
_LLAMA3_PRE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PRE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_REGEXES: dict[str, str | None] = {
    "default": _GPT2_PRE,
    "gpt2": _GPT2_PRE,
    "gpt-2": _GPT2_PRE,
    "smollm": _GPT2_PRE,
    "starcoder": _GPT2_PRE,
    "llama-bpe": _LLAMA3_PRE,
    "llama3": _LLAMA3_PRE,
    "qwen2": _QWEN2_PRE,
}

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


class TokenizerError(ValueError):
    """The tokenizer data is missing, malformed or of a kind we do not support."""


def _to_str(x: Any) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


class BPETokenizer:
    """A byte-level BPE tokenizer with the special ids and chat format of its model.

    ``encode`` never adds BOS/EOS (``add_bos`` tells callers whether the model expects one);
    special-token text such as ``<|im_start|>`` in the input is recognized as the special id,
    as Hugging Face tokenizers do.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None = None,
        unk_id: int | None = None,
        chat_template: str | None = None,
        add_bos: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.unk_id = unk_id
        self.chat_template = chat_template
        self.add_bos = add_bos
        size = self.vocab_size
        for name, value in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id), ("unk", unk_id)):
            if value is not None and not 0 <= value < size:
                raise TokenizerError(f"{name}_id={value} outside the vocabulary [0, {size})")

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_vocab_and_merges(
        cls,
        tokens: Sequence[str],
        merges: Sequence[str],
        *,
        token_types: Sequence[int] | None = None,
        pre: str = "default",
        **special: Any,
    ) -> BPETokenizer:
        """From GGUF-style lists: ``tokens[i]`` is id i, ``merges`` are "left right" strings.

        Control and user-defined tokens (GGUF token types 3 and 4) become added special
        tokens, matched whole in the input before BPE.
        """
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

        tokens = [_to_str(t) for t in tokens]
        if not tokens:
            raise TokenizerError("empty token list")
        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)
        pairs = []
        for m in merges:
            parts = _to_str(m).split(" ")
            if len(parts) != 2:
                raise TokenizerError(f"malformed BPE merge {m!r} (expected 'left right')")
            pairs.append((parts[0], parts[1]))
        try:
            tok = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False))
        except Exception as e:  # noqa: BLE001 - the library raises plain Exception
            raise TokenizerError(f"cannot build BPE from vocab and merges: {e}") from e
        if pre not in PRE_TOKENIZER_REGEXES:
            logging.warning(
                "Unknown pre-tokenizer %r; using the GPT-2 regex (ids may differ slightly)", pre
            )
        regex = PRE_TOKENIZER_REGEXES.get(pre)
        if regex is None:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(
                add_prefix_space=False, trim_offsets=False, use_regex=True
            )
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                    pre_tokenizers.ByteLevel(
                        add_prefix_space=False, trim_offsets=False, use_regex=False
                    ),
                ]
            )
        tok.decoder = decoders.ByteLevel()
        if token_types is not None:
            if len(token_types) != len(tokens):
                raise TokenizerError(f"{len(token_types)} token types for {len(tokens)} tokens")
            specials = [
                AddedToken(tokens[i], special=True, normalized=False)
                for i, t in enumerate(token_types)
                if int(t) in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED) and tokens[i]
            ]
            tok.add_special_tokens(specials)
        return cls(tok, **special)

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> BPETokenizer:
        """From the ``tokenizer.*`` keys of a GGUF file (byte-level BPE, i.e. model 'gpt2')."""
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise TokenizerError(
                f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')"
            )
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            if not isinstance(metadata.get(key), list | tuple):
                raise TokenizerError(f"GGUF metadata lacks the list {key}")

        def special(key: str) -> int | None:
            v = metadata.get(f"tokenizer.ggml.{key}")
            return int(v) if isinstance(v, int) and not isinstance(v, bool) else None

        return cls.from_vocab_and_merges(
            metadata["tokenizer.ggml.tokens"],
            metadata["tokenizer.ggml.merges"],
            token_types=metadata.get("tokenizer.ggml.token_type"),
            pre=str(metadata.get("tokenizer.ggml.pre", "default")),
            bos_id=special("bos_token_id"),
            eos_id=special("eos_token_id"),
            pad_id=special("padding_token_id"),
            unk_id=special("unknown_token_id"),
            chat_template=metadata.get("tokenizer.chat_template"),
            add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        )

    @classmethod
    def from_tokenizer_json(
        cls, path: str | Path, tokenizer_config: Mapping[str, Any] | None = None
    ) -> BPETokenizer:
        """From a Hugging Face ``tokenizer.json`` (and optionally its ``tokenizer_config.json``).

        Special tokens are looked up by their text in the config (``bos_token`` etc.).
        """
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001
            raise TokenizerError(f"cannot read tokenizer file {path}: {e}") from e
        cfg = dict(tokenizer_config or {})

        def special(key: str) -> int | None:
            value = cfg.get(key)
            if isinstance(value, dict):  # {"content": "<s>", ...}
                value = value.get("content")
            return None if value is None else tok.token_to_id(str(value))

        return cls(
            tok,
            bos_id=special("bos_token"),
            eos_id=special("eos_token"),
            pad_id=special("pad_token"),
            unk_id=special("unk_token"),
            chat_template=cfg.get("chat_template")
            if isinstance(cfg.get("chat_template"), str)
            else None,
            add_bos=bool(cfg.get("add_bos_token", False)),
        )

    @classmethod
    def from_hf_dir(cls, directory: str | Path) -> BPETokenizer:
        """From a Hugging Face model folder (``tokenizer.json`` + ``tokenizer_config.json``)."""
        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        if not path.exists():
            raise TokenizerError(f"{directory} has no {TOKENIZER_FILE}")
        cfg_path = directory / "tokenizer_config.json"
        try:
            cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{cfg_path}: invalid JSON ({e})") from e
        if not isinstance(cfg, dict):
            raise TokenizerError(f"{cfg_path}: not a JSON object")
        return cls.from_tokenizer_json(path, cfg)

    # -- saving and loading with an imported checkpoint ----------------------------------
    def save(self, directory: str | Path) -> dict[str, Any]:
        """Writes ``tokenizer.json`` into ``directory``; returns the spec for ``config.json``."""
        self.tokenizer.save(str(Path(directory) / TOKENIZER_FILE))
        return {
            "file": TOKENIZER_FILE,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "unk_id": self.unk_id,
            "add_bos": self.add_bos,
            "chat_template": self.chat_template,
        }

    @classmethod
    def load(cls, directory: str | Path, spec: Mapping[str, Any] | None = None) -> BPETokenizer:
        """Rebuilds the tokenizer saved by ``save`` (spec from ``config.json`` if not given)."""
        from tokenizers import Tokenizer

        directory = Path(directory)
        if spec is None:
            config = json.loads((directory / "config.json").read_text())
            spec = config.get("tokenizer")
            if not spec:
                raise TokenizerError(f"{directory}/config.json has no tokenizer")
        tok = Tokenizer.from_file(str(directory / spec.get("file", TOKENIZER_FILE)))
        return cls(
            tok,
            bos_id=spec.get("bos_id"),
            eos_id=spec.get("eos_id"),
            pad_id=spec.get("pad_id"),
            unk_id=spec.get("unk_id"),
            chat_template=spec.get("chat_template"),
            add_bos=bool(spec.get("add_bos", False)),
        )

    @classmethod
    def from_path(cls, path: str | Path) -> BPETokenizer:
        """From whatever ``path`` is: a ``.gguf`` file, a ``tokenizer.json``, an imported
        checkpoint directory (with ``config.json`` naming its tokenizer) or a HF folder."""
        path = Path(path)
        if path.is_file() and path.suffix == ".gguf":
            from user_llm.convert import gguf as gguf_lib

            with gguf_lib.GGUFFile(path) as f:
                return cls.from_gguf_metadata(f.metadata)
        if path.is_file():
            return cls.from_tokenizer_json(path)
        config = path / "config.json"
        if config.exists() and "tokenizer" in json.loads(config.read_text()):
            return cls.load(path)
        return cls.from_hf_dir(path)

    # -- use ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of the full tokenizer definition, for equality checks and caching."""
        payload = self.tokenizer.to_str() + json.dumps(
            [self.bos_id, self.eos_id, self.pad_id, self.unk_id, self.chat_template]
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with no BOS/EOS added."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [
            list(e.ids) for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        ]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.tokenizer.id_to_token(int(i))

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = True,
        system_prompt: str | None = None,
    ) -> str:
        """Renders ``[{"role": ..., "content": ...}]`` with the model's own Jinja chat template,
        as Hugging Face's ``apply_chat_template`` does (sandboxed, ``trim_blocks`` and
        ``lstrip_blocks``), so whatever the template inserts (SmolLM2: a default system
        message) is what the model was tuned on. ``system_prompt`` adds a system message when
        the chat has none. A tokenizer without a template renders ChatML."""
        messages = [dict(m) for m in messages]
        for m in messages:
            if "role" not in m or "content" not in m:
                raise TokenizerError(f"chat message {m!r} needs 'role' and 'content'")
        if system_prompt is not None and (not messages or messages[0]["role"] != "system"):
            messages.insert(0, {"role": "system", "content": system_prompt})
        template = _jinja_template(self.chat_template or _CHATML_TEMPLATE)
        return template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.id_to_token(self.bos_id) if self.bos_id is not None else "",
            eos_token=self.id_to_token(self.eos_id) if self.eos_id is not None else "",
        )


# ChatML, for a tokenizer that carries no template of its own.
_CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@functools.lru_cache(maxsize=8)
def _jinja_template(source: str) -> Any:
    """A compiled chat template, in the sandbox Hugging Face renders templates in."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TokenizerError(f"the chat template refused the chat: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise TokenizerError(f"the model's chat template is not valid Jinja: {e}") from e
