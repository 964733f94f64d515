r"""XManager launcher: packages this repo as a container and runs the train entry point.

    python launch/xmanager_launch.py --accelerator=TPU_V3 --count=8 -- \
      --gin_file=experiments/movielens_titles_lm.gin --gin.MODEL_DIR=\"/gcs/bucket/runs/x\"
    python launch/xmanager_launch.py --dry_run -- ...   # print the job, import nothing

Uses XManager's local API with the Vertex AI executor (``xm_local.Vertex``). ``xmanager`` is
an optional dependency (``pip install xmanager``): it is imported only for a real launch, so
``--dry_run`` works without it. Inside the job, ``USER_LLM_DISTRIBUTED=auto`` lets
``user_llm.distributed`` hand process discovery to ``jax.distributed.initialize()``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ACCELERATORS = ("A100", "H100", "V100", "T4", "TPU_V2", "TPU_V3")
DEFAULT_TRAIN_ARGS = (
    "--gin_file=experiments/movielens_titles_lm.gin",
    '--gin.MODEL_DIR="/gcs/user_llm/runs/movielens_titles_lm"',
)


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """What the launcher asks XManager for; printed as is by ``--dry_run``."""

    title: str
    module: str
    args: tuple[str, ...]
    accelerator: str
    count: int
    base_image: str
    env: tuple[tuple[str, str], ...]

    def command(self) -> str:
        """The command the container runs (one process per host)."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env)
        return f"{env} python -m {self.module} {shlex.join(self.args)}"


def build_spec(args: argparse.Namespace, train_args: Sequence[str]) -> JobSpec:
    return JobSpec(
        title=args.title,
        module="user_llm.train",
        args=tuple(train_args) or DEFAULT_TRAIN_ARGS,
        accelerator=args.accelerator,
        count=args.count,
        base_image=args.base_image,
        env=(("USER_LLM_DISTRIBUTED", "auto"), ("TF_CPP_MIN_LOG_LEVEL", "2")),
    )


def launch(spec: JobSpec) -> None:
    """Creates the experiment (needs ``xmanager`` and gcloud credentials)."""
    try:
        from xmanager import xm, xm_local
    except ImportError as e:  # optional dependency: say how to get it
        raise SystemExit(
            "xmanager is not installed: pip install xmanager (or use --dry_run)"
        ) from e

    with xm_local.create_experiment(experiment_title=spec.title) as experiment:
        [executable] = experiment.package(
            [
                xm.python_container(
                    executor_spec=xm_local.Vertex.Spec(),
                    path=str(REPO_ROOT),
                    base_image=spec.base_image,
                    entrypoint=xm.ModuleName(spec.module),
                    use_deep_module=True,
                )
            ]
        )
        requirements = xm.JobRequirements(**{spec.accelerator: spec.count})
        experiment.add(
            xm.Job(
                executable=executable,
                executor=xm_local.Vertex(requirements=requirements),
                args=list(spec.args),
                env_vars=dict(spec.env),
            )
        )


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--title", default="user_llm")
    parser.add_argument("--accelerator", choices=ACCELERATORS, default="TPU_V3")
    parser.add_argument("--count", type=int, default=8, help="accelerators per job")
    parser.add_argument("--base_image", default="python:3.11")
    parser.add_argument("--dry_run", action="store_true", help="print the job only")
    args = parser.parse_args(argv[:split])
    args.dry_run = args.dry_run or os.environ.get("DRY_RUN") == "1"
    return args, argv[split + 1 :]


def main(argv: Sequence[str]) -> int:
    args, train_args = parse_args(argv)
    spec = build_spec(args, train_args)
    if args.dry_run:
        print(f"# XManager job {spec.title!r} on Vertex AI: {spec.count} x {spec.accelerator}")
        print(f"# image {spec.base_image}, source {REPO_ROOT}")
        print(spec.command())
        return 0
    launch(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
