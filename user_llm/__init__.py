"""User-LLM: user embeddings from interaction histories contextualize an LLM."""

import os

# TensorFlow (the data pipeline) logs CUDA probing at INFO from C++ as soon as it is imported,
# before any entry point runs: quiet by default, as T5X's launchers do; set it to 0 to see them.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
