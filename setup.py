"""user_llm: User-LLM (arXiv 2402.13598) in JAX/Flax, with T5X conventions.

Every dependency is pinned here, in one place. The versions are the set that
resolves together on Python 3.11 (see docs in ../shared/docs/STACK.md when
working inside the project workspace).
"""

import setuptools

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "seqio==0.0.20",
    "clu==0.0.12",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "importlib-resources==7.1.0",  # TFDS locates a builder's code through it
    "etils==1.15.0",  # epath: the TFDS Beam builders' shard files (local or gs://)
    "gin-config==0.5.0",
    "sentencepiece==0.2.3",
    "numpy==2.4.6",
    "protobuf==7.36.2",
    "absl-py==2.5.1",
    "pandas==3.1.1",
    "pyarrow==26.0.1",
    "gguf==0.19.0",
    "safetensors==0.8.0",
    "tokenizers==0.23.3",
    "jinja2==3.1.6",  # renders the model's own chat template
    "tensorboard==2.21.0",
    "rouge-score==0.1.2",  # ROUGE-Lsum for review generation
    "nltk==3.10.4",  # rouge-score's tokenizer dependency, pinned
    "matplotlib==3.11.2",  # result plots
]

# Offline caching of SeqIO tasks with Apache Beam (seqio.scripts.cache_tasks_main). apache-beam
# 2.77.0 itself declares protobuf<7 and pyarrow<26, which the stack above cannot take, so it is
# installed on its own with --no-deps (it runs with protobuf 7 and pyarrow 26: tested); this extra
# pins the rest of what it needs at runtime.
BEAM_REQUIRES = [
    "beartype==0.22.9",
    "crcmod==1.7",  # Beam's tfrecord sink needs a CRC32C implementation
    "cryptography==50.0.2",
    "fastavro==1.13.1",
    "fasteners==0.20",
    "httplib2==0.32.1",
    "jsonpickle==4.1.4",
    "objsize==0.7.1",
    "proto-plus==1.29.0",
    "pymongo==4.20.1",
    "pytz==2026.6",
    "sortedcontainers==2.4.0",
    "zstandard==0.25.0",
]

EXTRAS_REQUIRE = {
    "beam": BEAM_REQUIRES,
    # The `tfds build` command line (user_llm.data.tfds_builders) imports mlcroissant.
    "tfds": ["mlcroissant==1.1.1"],
    "test": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",
        "hypothesis==6.170.17",
        "ruff==0.17.6",
    ],
}

setuptools.setup(
    name="user_llm",
    version="0.1.0",
    description="User-LLM: user-embedding contextualization of LLMs, in JAX/Flax",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["user_llm", "user_llm.*", "tasks", "tasks.*"]),
    package_data={"user_llm": ["data/bundled/*"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
