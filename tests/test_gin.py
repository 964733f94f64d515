"""Every gin file parses, finalizes and builds what it describes; config errors are specific."""

from __future__ import annotations

from pathlib import Path

import gin
import pytest
from conftest import REPO_ROOT, run_module

from user_llm import gin_utils
from user_llm.gin_utils import GinConfigError

GIN_DIR = REPO_ROOT / "gin"
ALL_GIN_FILES = sorted(str(p.relative_to(GIN_DIR)) for p in GIN_DIR.rglob("*.gin"))
# Values for the REQUIRED macros of run files, so that every file can be finalized.
REQUIRED_VALUES = {
    "MODEL_DIR": "'/tmp/unused'",
    "MIXTURE_OR_TASK_NAME": "'movielens_titles_lm'",
    "TASK_FEATURE_LENGTHS": "{'targets': 16}",
    "TRAIN_STEPS": "1",
    "LLM_CHECKPOINT": "'/tmp/unused_llm'",
    "ENCODER_CHECKPOINT": "'/tmp/unused_encoder'",
    "ITEM_TEXT_TABLE": "'/tmp/unused_item_titles.npy'",
}
# Overlays are not standalone: they are composed on top of an experiment.
# Overlays and the experiment file each is composed after.
OVERLAYS = {
    "local_tiny.gin": "experiments/movielens_titles_lm.gin",
}
# Dataset overlays: each experiment file is composed with one (the first for the others).
DATASETS = sorted(f for f in ALL_GIN_FILES if f.startswith("datasets/"))


# Files that are not standalone, and what they are composed after.
TINY_LLM, AR = "models/llm/decoder_tiny.gin", "models/user_encoder/ar.gin"
XATTN = "models/integration/cross_attention.gin"
COMPOSED_AFTER = {
    "runs/train_lm.gin": [TINY_LLM],
    "runs/pretrain_encoder.gin": [AR, "models/encoder_pretrain.gin"],
    "runs/finetune_user_llm.gin": [TINY_LLM, AR, XATTN],
    "models/encoder_pretrain.gin": [AR],
    XATTN: [TINY_LLM, AR],
    "models/integration/soft_prompt.gin": [TINY_LLM, AR],
    "models/integration/perceiver.gin": [TINY_LLM, AR, XATTN],
    "models/integration/perceiver_plus_states.gin": [TINY_LLM, AR, XATTN],
    "models/integration/belief_tokens.gin": [TINY_LLM, AR, XATTN],
}


def _files_for(name: str) -> list[str]:
    if name in DATASETS:
        return ["experiments/tp_tiny.gin", name]  # no encoder: Google Local needs no data
    if name in OVERLAYS:
        return [OVERLAYS[name], name]
    files = COMPOSED_AFTER.get(name, []) + [name]
    return files + ["datasets/movielens.gin"] if _needs_dataset(files) else files


def _needs_dataset(files: list[str]) -> bool:
    """Whether the files read ``%DATASET`` (experiment files and the user encoder's sizes)."""
    texts = gin_utils.gin_texts(files, gin_utils.DEFAULT_SEARCH_PATHS)
    return any("%DATASET" in text for text in texts)


def _bindings_for(files: list[str]) -> list[str]:
    """Values for the REQUIRED macros (the encoder's sizes: the entry point binds them)."""
    required = gin_utils.required_macros(files, gin_utils.DEFAULT_SEARCH_PATHS)
    return [f"{m} = {REQUIRED_VALUES[m]}" for m in required if m in REQUIRED_VALUES]


def test_gin_files_exist():
    assert "runs/train_lm.gin" in ALL_GIN_FILES
    assert "local_tiny.gin" in ALL_GIN_FILES
    assert any(f.startswith("experiments/") for f in ALL_GIN_FILES)
    assert any(f.startswith("models/") for f in ALL_GIN_FILES)


@pytest.mark.parametrize("name", ALL_GIN_FILES)
def test_every_gin_file_parses_finalizes_and_builds(name):
    files = _files_for(name)
    gin_utils.parse_gin(files, _bindings_for(files))
    try:
        # Whatever a file defines, a model or a run, must build.
        if _has_macro("MODEL"):
            model = gin.query_parameter("%MODEL").scoped_configurable_fn()
            assert model.module.config.num_layers > 0
            if "integration/" in name:
                module = model.module
                mode = "soft_prompt" if "soft_prompt" in name else "cross_attention"
                assert module.integration.mode == mode
                assert bool(module.decoder_config.cross_attention_layers) == (mode != "soft_prompt")
                assert module.integration.use_perceiver == ("perceiver" in name)
                plus_states = name.endswith("perceiver_plus_states.gin")
                assert module.integration.keep_encoder_states == plus_states
                assert bool(module.integration.belief_top_k) == name.endswith("belief_tokens.gin")
                assert bool(module.integration.recency_positions) == name.endswith("recency.gin")
        if "runs/" in name or "experiments/" in name or name in OVERLAYS:
            from user_llm import train as train_lib

            configured = gin.get_configurable(train_lib.train)
            assert configured is not None
            assert gin.query_parameter("train_lib.train.num_train_steps") is not None
    finally:
        gin.clear_config()


# The experiment files that name no dataset (the titles LM is MovieLens' own text corpus).
DATASET_FREE = [
    f
    for f in ALL_GIN_FILES
    if f.startswith("experiments/") and f != "experiments/movielens_titles_lm.gin"
]


@pytest.mark.parametrize("dataset", DATASETS)
def test_each_experiment_runs_on_each_dataset_through_its_overlay(dataset):
    """Experiment x dataset overlay: the task or mixture name follows the overlay's DATASET
    and the experiment's HISTORY_LENGTH, and is registered; no experiment names a dataset."""
    import seqio

    import tasks.smollm2  # noqa: F401 - the SmolLM2 tasks and mixtures
    from user_llm.data import families, feature_sizes

    assert len(DATASET_FREE) >= 5
    name = dataset.removeprefix("datasets/").removesuffix(".gin")
    for experiment in DATASET_FREE:
        code = "\n".join(ln.split("#")[0] for ln in (GIN_DIR / experiment).read_text().splitlines())
        assert not [d for d in families.BUILT_IN if d in code], experiment
        files = [experiment, dataset]
        bindings = [b for b in _bindings_for(files) if not b.startswith("MIXTURE_OR_TASK_NAME")]
        required = gin_utils.required_macros(files, gin_utils.DEFAULT_SEARCH_PATHS)
        # Sizes of our own, so Google Local (no data here) needs no data to configure.
        bindings += [f"{m} = 10" for m in feature_sizes.MACROS if m in required]
        gin_utils.parse_gin(files, [*bindings, "HISTORY_LENGTH = 100"])
        try:
            task = gin_utils.macro_value("MIXTURE_OR_TASK_NAME")
            assert task.startswith(f"{name}_") and "_h100" in task, (experiment, task)
            assert task in seqio.TaskRegistry.names() or task in seqio.MixtureRegistry.names()
        finally:
            gin.clear_config()


def test_a_renamed_experiment_file_says_what_to_use():
    with pytest.raises(
        GinConfigError,
        match="now --gin_file=experiments/tp_tiny.gin --gin_file=datasets/movielens.gin",
    ):
        gin_utils.parse_gin(["experiments/movielens_tp_tiny.gin"])
    with pytest.raises(GinConfigError, match="Required gin macro.*DATASET"):
        gin_utils.parse_gin(["experiments/tp_tiny.gin"], ["MODEL_DIR = 'x'"])


def _has_macro(name: str) -> bool:
    try:
        gin.query_parameter(f"%{name}")
        return True
    except ValueError:
        return False


def test_run_files_open_with_their_required_macros():
    for path in (GIN_DIR / "runs").glob("*.gin"):
        text = path.read_text()
        head = text.split("from __gin__")[0].split("include ")[0]
        declared = gin_utils._REQUIRED_MACRO.findall(text)
        assert declared, f"{path.name} declares no REQUIRED macro"
        for macro in declared:
            assert macro in head, f"{path.name} does not list REQUIRED macro {macro} at the top"


def test_missing_required_macro_is_named():
    with pytest.raises(GinConfigError, match="MODEL_DIR"):
        gin_utils.parse_gin(["experiments/movielens_titles_lm.gin"], [], finalize=False)
    gin.clear_config()


def test_unknown_binding_is_named():
    with pytest.raises(GinConfigError, match="embedd_dim"):
        gin_utils.parse_gin(
            ["models/llm/decoder_tiny.gin"], ["decoder.DecoderConfig.embedd_dim = 3"]
        )
    with pytest.raises(GinConfigError, match="nothere.Foo"):
        gin_utils.parse_gin(["models/llm/decoder_tiny.gin"], ["nothere.Foo.x = 3"])
    gin.clear_config()


def test_misspelled_macro_is_an_error_with_a_suggestion():
    """gin would silently define a new macro BATCH_SIZ that nothing reads."""
    files = ["experiments/movielens_titles_lm.gin", "local_tiny.gin"]
    with pytest.raises(GinConfigError, match=r"BATCH_SIZ \(did you mean BATCH_SIZE"):
        gin_utils.parse_gin(files, ["MODEL_DIR='/tmp/x'", "BATCH_SIZ = 4"], finalize=False)
    # A macro read by another binding is fine, and so is every macro the files read.
    gin_utils.parse_gin(
        files, ["MODEL_DIR='/tmp/x'", "MY_STEPS = 7", "TRAIN_STEPS = %MY_STEPS"], finalize=False
    )
    assert gin.query_parameter("TRAIN_STEPS/macro.value") is not None
    gin.clear_config()


def test_missing_gin_file_is_named(tmp_path: Path):
    with pytest.raises(GinConfigError, match="no_such_file.gin"):
        gin_utils.parse_gin(["no_such_file.gin"])


def test_gin_shorthand_flags_are_rewritten():
    argv = ["prog", '--gin.MODEL_DIR="/tmp/x"', "--gin_file=a.gin", "--other=1"]
    assert gin_utils.rewrite_gin_args(argv) == [
        "prog",
        '--gin_bindings=MODEL_DIR="/tmp/x"',
        "--gin_file=a.gin",
        "--other=1",
    ]


def test_a_runs_folder_in_the_working_directory_does_not_break_includes(tmp_path, monkeypatch):
    """``--model_dir=runs/...`` makes a ``runs/`` folder, which Python sees as a namespace
    package; gin's package-file reader crashed on it for ``include 'runs/...'``."""
    (tmp_path / "runs" / "main").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        gin_utils.parse_gin(
            ["experiments/encoder_pretrain.gin", "datasets/movielens.gin"], ["MODEL_DIR = 'x'"], []
        )
        assert gin.query_parameter("%TRAIN_STEPS") == 1500
    finally:
        gin.clear_config()


def test_includes_log_no_spurious_path_not_found_errors():
    """gin's package-file check logged ``ERROR ... Path not found`` for each include and
    search path that is not a Python package; a clean parse logs no error at all."""
    code = (
        "from user_llm import gin_utils; "
        "gin_utils.parse_gin(['experiments/user_llm_tiny.gin', 'datasets/movielens.gin'], "
        "[f'{m} = \\'x\\'' for m in ('MODEL_DIR', 'LLM_CHECKPOINT', 'ENCODER_CHECKPOINT')], "
        "[], finalize=False); print('parsed')"
    )
    proc = run_module(["-c", code], check=False)
    assert "parsed" in proc.stdout, proc.stderr[-3000:]
    assert "Path not found" not in proc.stderr, proc.stderr[-3000:]
    assert not [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")], proc.stderr


@pytest.mark.parametrize(
    "module,flag",
    [
        ("user_llm.train", "--gin_file"),
        ("user_llm.evaluate", "--num_examples"),
        ("user_llm.generate", "--max_decode_length"),
        ("user_llm.main_job", "--eval_examples"),
        ("user_llm.item_text_table", "--llm_checkpoint"),
        ("user_llm.encoder_eval", "--split"),
        ("user_llm.import_checkpoint", "--gguf"),
        ("user_llm.probe", "--probe_steps"),
        ("user_llm.experiments", "--rows"),
    ],
)
def test_help_exits_0_and_lists_the_entry_points_flags(module, flag):
    proc = run_module(["-m", module, "--help"], check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert flag in proc.stdout and "tensor_tracer" not in proc.stdout
    assert "--gin_file" in proc.stdout and "--num_processes" in proc.stdout  # the project's


ENTRY_POINTS = ("train", "evaluate", "encoder_eval", "generate", "main_job", "import_checkpoint",
                "item_text_table", "probe", "experiments", "gin_utils", "distributed")  # fmt: skip


def test_importing_every_entry_point_in_one_process_defines_no_flag():
    """Flags live in entry points: a library (or a notebook) imports them all side by side."""
    code = (
        "import importlib; from absl import flags; "
        f"[importlib.import_module('user_llm.' + m) for m in {ENTRY_POINTS!r}]; "
        "ours = [m for m, f in flags.FLAGS.flags_by_module_dict().items() "
        "if f and m.startswith('user_llm')]; print('defined by', ours)"
    )
    proc = run_module(["-c", code], check=False, timeout=300)
    assert "defined by []" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_module_import_registers_your_own_configurables_before_gin(tmp_path):
    (tmp_path / "my_tasks.py").write_text(
        "import gin\n\n@gin.configurable\ndef marker(x=0):\n    return x\n"
    )
    args = ["-m", "user_llm.train", "--gin_file=experiments/movielens_titles_lm.gin",
            "--gin_file=local_tiny.gin", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
            "--gin.TRAIN_STEPS=-1", "--gin.marker.x=1"]  # fmt: skip
    env = {"PYTHONPATH": str(tmp_path)}
    without = run_module(args, env_extra=env, check=False)
    assert without.returncode == 2 and "marker" in without.stderr
    missing = run_module([*args[:2], "--module_import=not_a_module_xyz"], check=False)
    assert missing.returncode == 2
    assert "--module_import=not_a_module_xyz: cannot import it" in missing.stderr
    with_import = run_module([*args[:2], "--module_import=my_tasks", *args[2:]], env_extra=env,
                             check=False)  # fmt: skip
    assert "marker" not in with_import.stderr, with_import.stderr[-2000:]
    # It got as far as the train loop, whose own check stops a negative step count cleanly.
    assert with_import.returncode == 1
    assert "ERROR: TRAIN_STEPS must be a whole number >= 0, got -1" in with_import.stderr


def test_no_gin_file_is_one_clear_line():
    proc = run_module(["-m", "user_llm.train"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "ERROR: no --gin_file" in proc.stderr


def test_library_info_logs_are_filtered_but_warnings_ours_and_verbose_pass():
    import logging

    from absl import logging as absl_logging

    def passes(path: str, level: int) -> bool:
        record = logging.LogRecord("absl", level, path, 1, "message", None, None)
        return gin_utils.LibraryInfoFilter().filter(record)

    orbax = "/venv/lib/python3.11/site-packages/orbax/checkpoint/checkpoint_manager.py"
    assert not passes(orbax, logging.INFO)
    assert passes(orbax, logging.WARNING) and passes(orbax, logging.ERROR)
    assert passes(gin_utils.__file__, logging.INFO)  # this project's own progress
    assert passes("/home/me/project/my_tasks.py", logging.INFO)  # a researcher's module
    before = absl_logging.get_verbosity()
    absl_logging.set_verbosity(1)
    try:
        assert passes(orbax, logging.INFO)  # --verbosity=1 shows everything
    finally:
        absl_logging.set_verbosity(before)


def test_gin_decoder_config_is_the_model_a_gin_file_trains():
    """Benchmarks time the decoder a gin file binds (``user_llm.testing``), not a re-typed copy."""
    import gin

    from user_llm import testing

    smollm2 = testing.gin_decoder_config("models/llm/smollm2_135m.gin")
    assert (smollm2.vocab_size, smollm2.num_layers, smollm2.num_kv_heads) == (49152, 30, 3)
    assert smollm2.rope_theta == 100000.0 and smollm2.tie_embeddings
    small = testing.gin_decoder_config("models/llm/decoder_100m.gin", num_layers=4)
    assert (small.num_layers, small.embed_dim, small.tie_embeddings) == (4, 768, False)
    assert gin.config_str() == ""  # the caller's gin state is left clear
