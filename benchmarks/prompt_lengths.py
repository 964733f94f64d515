r"""How long a task's prompts are, and what length buckets would save.

  python benchmarks/prompt_lengths.py [--task=movielens_tp_h20_smollm2] [--examples=2000] \
      [--feature_lengths=960,24] [--batch_sizes=4,16] [--buckets=64,128] [--output=FILE.md]

Reads ``--examples`` shuffled training examples of the task (uncut: ``sequence_length=None``),
counts their ``inputs`` and ``targets`` tokens, and reports: the percentiles; the share of
examples whose inputs are longer than ``--feature_lengths`` allows (SeqIO cuts their end,
which for a text prompt is the question); the padding share at that length; and, for random
batches of each size, the mean position count a batch needs when it is cut to its longest row
rounded up to each bucket (``DatasetConfig.length_bucket``) against the full length.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from results_file import publish


def lengths(task: str, examples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    import seqio

    import tasks.smollm2  # noqa: F401 - registers the SmolLM2-tokenized tasks

    ds = seqio.get_mixture_or_task(task).get_dataset(
        sequence_length=None, split="train", shuffle=True, seed=seed, use_cached=False
    )
    rows = [(len(x["inputs"]), len(x["targets"])) for x in ds.take(examples).as_numpy_iterator()]
    return np.array([r[0] for r in rows]), np.array([r[1] for r in rows])


def bucket_savings(
    total: np.ndarray, cap: int, batch: int, bucket: int, draws: int = 2000, seed: int = 0
) -> float:
    """Mean positions a random batch needs, cut to its longest (capped) row rounded up."""
    rng = np.random.default_rng(seed)
    rows = [rng.choice(len(total), batch, replace=False) for _ in range(draws)]
    longest = np.array([np.minimum(total[r], cap).max() for r in rows])
    return float(np.minimum(-(-longest // bucket) * bucket, cap).mean())


def report(task: str, inputs: np.ndarray, targets: np.ndarray, args) -> str:
    cap_in, cap_tg = (int(x) for x in args.feature_lengths.split(","))
    cap = cap_in + cap_tg
    total = np.minimum(inputs, cap_in) + np.minimum(targets, cap_tg)

    def pct(a: np.ndarray) -> str:
        quantiles = np.percentile(a, [10, 50, 90, 99])
        return " / ".join(f"{v:.0f}" for v in quantiles) + f" / {a.max()}"

    lines = [
        f"Command: `python benchmarks/prompt_lengths.py {' '.join(sys.argv[1:])}`",
        "",
        f"{len(inputs)} shuffled training examples of `{task}`, tokens:",
        "",
        "| | mean | p10 / p50 / p90 / p99 / max |",
        "|---|---|---|",
        f"| inputs | {inputs.mean():.0f} | {pct(inputs)} |",
        f"| targets | {targets.mean():.0f} | {pct(targets)} |",
        "",
        f"- Inputs longer than {cap_in} (cut at their end by SeqIO): "
        f"{(inputs > cap_in).mean():.1%}; targets longer than {cap_tg}: "
        f"{(targets > cap_tg).mean():.1%}.",
        f"- Padding at {cap_in} + {cap_tg} = {cap} positions: {1 - total.mean() / cap:.1%}.",
        "",
        "| batch | bucket | mean positions a batch needs | full length / that |",
        "|---|---|---|---|",
    ]
    for b in (int(x) for x in args.batch_sizes.split(",")):
        for m in (int(x) for x in args.buckets.split(",")):
            need = bucket_savings(total, cap, b, m)
            lines.append(f"| {b} | {m} | {need:.0f} of {cap} | {cap / need:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="movielens_tp_h20_smollm2")
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--feature_lengths", default="960,24", help="inputs,targets")
    parser.add_argument("--batch_sizes", default="4,16")
    parser.add_argument("--buckets", default="64,128")
    parser.add_argument("--output", default="")
    args = parser.parse_args()
    inputs, targets = lengths(args.task, args.examples)
    text = report(args.task, inputs, targets, args)
    publish(text, args.output)


if __name__ == "__main__":
    main()
