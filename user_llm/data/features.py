"""Per-example model features and text prompts built from ``Histories`` (numpy only, no TF).

``tasks/`` turns these dicts into SeqIO sources; keeping the logic here makes it testable
without TensorFlow and reusable from any input pipeline.

Forms of every task (same examples, same targets, so they are directly comparable):
- ``userllm``: the history as encoder arrays (``ENCODER_FEATURES``) + a short instruction.
- ``tp`` (text prompt): the same history items serialized into the prompt, oldest first and
  most recent last, one line each: ``title | rating/5 | genres | YYYY-MM-DD``.
- ``hybrid``: the encoder arrays (long-term) plus the last ``RECENT_ITEMS`` lines as text
  (short-term), the paper's combination of user embeddings with recent items in the prompt.

Candidate sets (ranking metrics, next-item tasks): per example ``NUM_NEGATIVES`` items the user
never interacted with (in any split), drawn by a counter-based hash of (seed, user), so they are
identical on every run, machine and split, plus the target inserted at ``candidate_label``
(also a hash of (seed, user)), i.e. ``candidate_item_index[candidate_label] == target``.
Negatives come from items that have a title and an item-vocabulary id (seen in training).
Two sets per example: ``candidate_*`` draws negatives in proportion to their training
popularity (so a popularity ranking cannot win by default: the negatives are as popular as the
targets tend to be), ``uniform_candidate_*`` uniformly over the pool (mostly obscure items; the
protocol of earlier results).

Encoder pretraining: the history window with the example's own target appended at the first
padded position (arrays of length ``L + 1``). Training examples end at training targets, so a
user's validation and test interactions appear only in that user's validation / test examples.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from user_llm.data.histories import NUM_RESERVED, OOV_ID, PAD_ID, Histories
from user_llm.feature_names import ITEM_TARGET

# The user arrays every User-LLM / encoder task emits (what UserEncoderConfig consumes).
ENCODER_FEATURES = (
    "user_item_ids",
    "user_ratings",
    "user_time_buckets",
    "user_genres",
    "user_mask",
)
NUM_NEGATIVES = 19
NEGATIVE_SAMPLINGS = ("popularity", "uniform")
# Feature-name prefix of each candidate set ("" is the headline set).
CANDIDATE_PREFIXES = {"popularity": "", "uniform": "uniform_"}
CANDIDATE_KEYS = ("candidate_item_index", "candidate_item_ids", "candidate_label")
TASKS = ("next_item", "favorite_genre", "review_gen", "encoder_pretrain")
# userllm: user embeddings + a short question; tp: the history as text; hybrid: user embeddings
# plus the last RECENT_ITEMS items as text (long-term embedding + short-term text).
FORMS = ("userllm", "tp", "hybrid")
RECENT_ITEMS = 5


@dataclasses.dataclass(frozen=True)
class DatasetText:
    """How a dataset's items are named in prompts."""

    item_noun: str = "movie"  # "movie", "product", "place"
    genre_noun: str = "genre"  # "genre", "category"
    action: str = "watch"  # what the user does with the next item
    max_rating: float = 5.0


def user_arrays(split: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The encoder arrays of a split (``user_mask`` as int32: SeqIO features are ints)."""
    out = {k: np.asarray(split[k], dtype=np.int32) for k in ENCODER_FEATURES}
    return out


def pretraining_arrays(split: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """History window with the target appended at position ``history_length`` (length L + 1).

    The encoder learns next-interaction prediction over the whole window; the appended target
    of a training example is itself a training interaction, never a validation / test one.
    """
    base = user_arrays(split)
    e = len(base["user_mask"])
    rows = np.arange(e)
    pos = np.asarray(split["history_length"], dtype=np.int64)
    out = {}
    for k, v in base.items():
        pad = np.zeros((e, 1) + v.shape[2:], dtype=v.dtype)
        out[k] = np.concatenate([v, pad], axis=1)
    out["user_item_ids"][rows, pos] = split["target_item_id"]
    out["user_ratings"][rows, pos] = split["target_rating_id"]
    out["user_time_buckets"][rows, pos] = split["target_time_bucket"]
    out["user_genres"][rows, pos] = split["target_genres"]
    out["user_mask"][rows, pos] = 1
    return out


# ---- candidate sets -------------------------------------------------------------------------
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a counter-based hash, so draws need no per-user RNG objects."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def _user_key(users: np.ndarray, seed: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        return _mix(np.uint64(seed) * _GOLDEN + users.astype(np.uint64) * _M2 + np.uint64(1))


def negative_pool(h: Histories) -> np.ndarray:
    """item_index of items usable as negatives: a title and an item-vocabulary id."""
    in_vocab = h.vocabularies["item"].lookup(h.item_ids) >= NUM_RESERVED
    has_title = np.asarray(h.item_titles, dtype=object).astype(bool)  # "" is False
    return np.flatnonzero(in_vocab & has_title).astype(np.int64)


def user_negatives(
    h: Histories,
    num_negatives: int = NUM_NEGATIVES,
    seed: int = 0,
    max_rounds: int = 12,
    sampling: str = "uniform",
) -> np.ndarray:
    """[users of h, num_negatives] item_index never interacted with by the user (-1: too few).

    ``sampling``: "uniform" over the pool, or "popularity" (probability proportional to the
    item's training interactions). Vectorized rejection sampling: each round draws a block of
    hashed draws per user, rejects the user's own items and repeats, keeps the first
    ``num_negatives`` distinct ones.
    """
    if sampling not in NEGATIVE_SAMPLINGS:
        raise ValueError(f"sampling must be one of {NEGATIVE_SAMPLINGS}, got {sampling!r}")
    pool = negative_pool(h)
    cdf = None
    if sampling == "popularity" and len(pool):
        vocab = h.vocabularies["item"]
        weights = vocab.counts[vocab.lookup(h.item_ids[pool])].astype(np.float64)
        cdf = np.cumsum(weights) / weights.sum()
    num_users = len(h.user_offsets) - 1
    out = np.full((num_users, num_negatives), -1, dtype=np.int64)
    if len(pool) == 0 or num_negatives == 0:
        return out
    n_items = np.int64(len(h.item_ids))
    lengths = np.diff(h.user_offsets)
    owner = np.repeat(np.arange(num_users, dtype=np.int64), lengths)
    seen = np.unique(owner * n_items + h.user_items.astype(np.int64))
    # Keyed by user_index, so a shard of users (``h.first_user``) draws what the whole does.
    base = _user_key(h.first_user + np.arange(num_users), seed)
    found = np.zeros(num_users, dtype=np.int64)
    todo = np.arange(num_users)
    draws = 2 * num_negatives + 8
    offset = 0
    for _ in range(max_rounds):
        if len(todo) == 0:
            break
        j = np.arange(offset, offset + draws, dtype=np.uint64)
        with np.errstate(over="ignore"):
            keys = _mix(base[todo, None] + j[None, :] * _GOLDEN)
        if cdf is None:
            cand = pool[(keys % np.uint64(len(pool))).astype(np.int64)]  # [T, draws]
        else:  # inverse CDF of a uniform in [0, 1) from the hash's top 53 bits
            u = (keys >> np.uint64(11)).astype(np.float64) * 2.0**-53
            cand = pool[np.minimum(np.searchsorted(cdf, u, side="right"), len(pool) - 1)]
        key = todo[:, None] * n_items + cand
        pos = np.minimum(np.searchsorted(seen, key), len(seen) - 1)
        valid = seen[pos] != key
        # Also reject items already chosen for the row and repeats within this block.
        prev = out[todo]  # [T, N]
        valid &= ~(cand[:, :, None] == prev[:, None, :]).any(-1)
        order = np.argsort(cand, axis=1, kind="stable")
        sorted_cand = np.take_along_axis(cand, order, axis=1)
        dup_sorted = np.zeros_like(sorted_cand, dtype=bool)
        dup_sorted[:, 1:] = sorted_cand[:, 1:] == sorted_cand[:, :-1]
        dup = np.zeros_like(dup_sorted)
        np.put_along_axis(dup, order, dup_sorted, axis=1)
        valid &= ~dup
        rank = found[todo, None] + np.cumsum(valid, axis=1) - 1
        take = valid & (rank < num_negatives)
        r, c = np.nonzero(take)
        out[todo[r], rank[r, c]] = cand[r, c]
        found[todo] = np.minimum(found[todo] + valid.sum(axis=1), num_negatives)
        todo = todo[found[todo] < num_negatives]
        offset += draws
        draws *= 2
    return out


def candidate_sets(
    h: Histories,
    split: dict[str, np.ndarray],
    negatives: np.ndarray,
    seed: int = 0,
    prefix: str = "",
) -> dict[str, np.ndarray]:
    """Per example: ``candidate_item_index`` [N+1] (item_index, -1 = none), the matching
    ``candidate_item_ids`` (encoder vocabulary ids, PAD for none) and ``candidate_label``,
    each name preceded by ``prefix``."""
    users = np.asarray(split["user_index"], dtype=np.int64)
    if len(users) and not (
        users.min() >= h.first_user and users.max() < h.first_user + len(negatives)
    ):
        raise IndexError("candidate_sets: examples of users outside these negatives' users")
    neg = negatives[users - h.first_user]
    e, n = neg.shape
    label = (_mix(_user_key(users, seed) ^ np.uint64(0x5EED)) % np.uint64(n + 1)).astype(np.int64)
    slots = np.arange(n + 1)[None, :]
    src = np.clip(slots - (slots > label[:, None]), 0, max(n - 1, 0))
    cands = np.take_along_axis(neg, src, axis=1) if n else np.zeros((e, 1), np.int64)
    cands = np.where(slots == label[:, None], split["target_item_index"][:, None], cands)
    vocab_ids = h.vocabularies["item"].lookup(h.item_ids[np.maximum(cands, 0)].ravel())
    ids = np.where(cands >= 0, vocab_ids.reshape(cands.shape), PAD_ID)
    return {
        f"{prefix}candidate_item_index": cands.astype(np.int32),
        f"{prefix}candidate_item_ids": ids.astype(np.int32),
        f"{prefix}candidate_label": label.astype(np.int32),
    }


# ---- text ---------------------------------------------------------------------------------
def format_rating(value: float) -> str:
    """4.0 -> "4", 3.5 -> "3.5"."""
    return f"{float(value):g}"


def instruction(task: str, text: DatasetText, item_title: str = "", rating: float = 0.0) -> str:
    """The short question a task asks (identical in both forms)."""
    if task == "next_item":
        return f"What {text.item_noun} will this user {text.action} next? Answer with its title."
    if task == "favorite_genre":
        return f"What is this user's favorite {text.genre_noun}?"
    if task == "review_gen":
        return (
            f'Write the review this user wrote for the {text.item_noun} "{item_title}", '
            f"which they rated {format_rating(rating)} out of {format_rating(text.max_rating)}."
        )
    raise ValueError(f"no instruction for task {task!r}")


def history_lines(
    h: Histories, split: dict[str, np.ndarray], text: DatasetText, last: int | None = None
) -> list[str]:
    """The history of each example as text lines joined by newlines (oldest first); only the
    ``last`` most recent items when given."""
    mask = np.asarray(split["user_mask"], dtype=bool)
    idx = split["user_item_index"]
    titles = h.item_titles
    max_r = format_rating(text.max_rating)
    ratings = split["user_rating_values"]
    dates = split["user_timestamps"].astype("datetime64[s]").astype("datetime64[D]").astype(str)
    # Genre lists: few distinct combinations, so join each combination once.
    genres = split["user_genres"]
    g = genres.shape[-1]
    combos, inverse = np.unique(genres.reshape(-1, g), axis=0, return_inverse=True)
    tokens = h.vocabularies["genre"].tokens
    combo_text = np.array(
        [", ".join(str(tokens[t]) for t in row if t not in (PAD_ID, OOV_ID)) for row in combos],
        dtype=object,
    )
    genre_text = combo_text[inverse.reshape(genres.shape[:2])]
    out = []
    for e in range(len(mask)):
        n = int(mask[e].sum())
        out.append(
            "\n".join(
                f"{titles[idx[e, i]]} | {format_rating(ratings[e, i])}/{max_r} | "
                f"{genre_text[e, i] or 'none'} | {dates[e, i]}"
                for i in range(n - min(n, last or n), n)
            )
        )
    return out


def text_prompt(history: str, question: str, text: DatasetText) -> str:
    """TP form: the serialized history, then the question."""
    return (
        f"A user's {text.item_noun} history, oldest first "
        f"(title | rating | {text.genre_noun}s | date):\n{history}\n{question}"
    )


def task_examples(
    h: Histories,
    split_name: str,
    task: str,
    form: str,
    text: DatasetText,
    *,
    review_texts: np.ndarray | None = None,
    negatives: dict[str, np.ndarray] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Every example of one (task, form, split) as numpy arrays (strings as object arrays).

    Examples without a target (no title, no genre, empty review) are dropped, in both forms
    alike, so ``userllm`` and ``tp`` always hold the same examples with the same targets.
    """
    split = h.splits[split_name]
    if task == "encoder_pretrain":
        return pretraining_arrays(split)
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; expected one of {FORMS}")
    if task == "next_item":
        targets = np.asarray(split["target_title"], dtype=object)
    elif task == "favorite_genre":
        targets = np.asarray(split["favorite_genre"], dtype=object)
    elif task == "review_gen":
        if review_texts is None:
            raise ValueError("review_gen needs the target interactions' review texts")
        targets = np.asarray(review_texts, dtype=object)
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    keep = np.flatnonzero(np.array([bool(t) for t in targets], dtype=bool))
    split = {k: v[keep] for k, v in split.items()}
    targets = targets[keep]
    titles = h.item_titles[split["target_item_index"]]
    questions = [
        instruction(task, text, titles[i], split["target_rating"][i]) for i in range(len(keep))
    ]
    out: dict[str, np.ndarray] = {}
    if form in ("userllm", "hybrid"):
        out.update(user_arrays(split))
    if form == "userllm":
        out["inputs"] = np.asarray(questions, dtype=object)
    else:
        hist = history_lines(h, split, text, RECENT_ITEMS if form == "hybrid" else None)
        out["inputs"] = np.asarray(
            [text_prompt(hh, q, text) for hh, q in zip(hist, questions, strict=True)], dtype=object
        )
    out["targets"] = targets
    # What an item head learns (models.item_targets): the next item's encoder id on next-item
    # examples, padding elsewhere, so a mixture trains it on the next-item questions alone.
    item_target = split["target_item_id"] if task == "next_item" else np.zeros(len(keep))
    out[ITEM_TARGET] = np.asarray(item_target, dtype=np.int32)
    # Every task carries the example's next-item candidate sets (only next-item metrics read
    # them), so the tasks of one dataset share their features and mix in one SeqIO mixture.
    negatives = dict(negatives or {})
    for sampling, prefix in CANDIDATE_PREFIXES.items():
        stored = [prefix + k for k in CANDIDATE_KEYS]
        if all(k in split for k in stored):  # built with the examples (a TFDS dataset)
            out.update({k: np.asarray(split[k]) for k in stored})
            continue
        if sampling not in negatives:
            negatives[sampling] = user_negatives(h, seed=seed, sampling=sampling)
        out.update(candidate_sets(h, split, negatives[sampling], seed=seed, prefix=prefix))
    return out
