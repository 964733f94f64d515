"""TFDS builders for the three dataset families: one example per user history window.

Each example is one row of ``Histories.splits[split]`` (the README's table of the fields a
history example gives a task: the window's encoder ids, raw ratings and times, the target and
its metadata), plus the target's review text, the titles of the window's items and both
next-item candidate sets. The catalogue (item ids and titles, genre names, vocabulary sizes)
is the dataset's metadata. Splits are the task splits (by time per user).

Builders and configs (``{source}_h{history_length}``, history lengths 20, 50, 100, 200):

- ``user_llm_movielens``: releases ``ml-latest-small`` (the bundled archive when the manual
  folder lacks it), ``ml-100k``, ``ml-1m``, ``ml-20m``, ``ml-25m``, ``ml-latest``;
- ``user_llm_amazon_reviews``: ``all`` (every category in the folder, as the SeqIO tasks read
  it) or one category (``All_Beauty``, ...; 2018 or 2023 files);
- ``user_llm_google_local``: ``all`` or one state (``Alaska``, ...).

Offline: the official files are read from the manual folder (``--manual_dir``), never fetched.

  pip install -e ".[tfds]"   # tfds build needs mlcroissant
  tfds build --imports=user_llm.data.tfds_builders user_llm_movielens \\
      --config=ml-latest-small_h50 --data_dir=~/tensorflow_datasets --manual_dir=<folder>

Reading: ``seqio.TfdsDataSource`` through the ``*_tfds`` tasks of ``tasks/tfds_tasks.py``,
which give the same examples as the reader-backed tasks (tested).

Large releases (``ml-20m``, ``ml-25m``, ``ml-latest``, every Amazon and Google Local config)
build with TFDS's Apache Beam support, in two passes:

1. the global pass, on the machine that runs ``tfds build``: read the files, code items and
   users, order the rows, count the training vocabularies (``histories.global_pass``: linear in
   the interactions, vectorized); it writes the tables once and the rows of each shard of
   ``users_per_shard`` users to the download folder;
2. the per-user pass, as Beam work over the shards: windows, targets, favourite genres,
   negatives and candidate sets (``histories_from_tables`` on each shard), encoding and
   writing. Its output is up to history-length times its input; it is what a runner
   (``--beam_pipeline_options=runner=DataflowRunner,...``; the DirectRunner by default)
   spreads over machines. The examples, their order (integer keys: the one-machine order) and
   the metadata equal the one-machine build's (tested).

Beam configs need the ``beam`` extra (the README's "Preprocessing at scale").
"""

from __future__ import annotations

import dataclasses
import functools
import pickle
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from user_llm.data import features as F
from user_llm.data.feature_sizes import FeatureSizes
from user_llm.data.histories import SPLITS, Histories, HistoryConfig, HistoryTables
from user_llm.data.readers.download import MOVIELENS_MD5
from user_llm.data.task_data import TaskData, read_tables, task_data_from_tables

VERSION = tfds.core.Version("1.0.0")
RELEASE_NOTES = {"1.0.0": "First release: history windows with targets and candidate sets."}
HISTORY_LENGTHS = (20, 50, 100, 200)
NUM_CANDIDATES = F.NUM_NEGATIVES + 1

# Per-window arrays [L] and per-example scalars of ``Histories.splits``, with the dtype they are
# written to TFDS in.
WINDOW = {
    "user_item_ids": np.int32,
    "user_item_index": np.int32,
    "user_ratings": np.int32,
    "user_rating_values": np.float32,
    "user_timestamps": np.int64,
    "user_time_buckets": np.int32,
    "user_mask": np.int32,  # bool in memory: stored as 0/1
}
SCALARS = {
    "user_index": np.int32,
    "history_length": np.int32,
    "target_position": np.int32,
    "target_item_id": np.int32,
    "target_item_index": np.int32,
    "target_rating": np.float32,
    "target_timestamp": np.int64,
    "favorite_genre_id": np.int32,
    "target_rating_id": np.int32,
    "target_time_bucket": np.int32,
}
TEXTS = ("target_title", "favorite_genre", "review_text", "user_id")


@dataclasses.dataclass
class HistoriesConfig(tfds.core.BuilderConfig):
    """One source (release, category or state, or ``all``) at one history length."""

    source: str = ""
    history_length: int = 50
    max_categories: int = HistoryConfig().max_categories
    # Build with Apache Beam: the per-user pass runs per shard of ``users_per_shard`` users.
    beam: bool = False
    users_per_shard: int = 10_000

    def history_config(self) -> HistoryConfig:
        return HistoryConfig(
            max_history_length=self.history_length, max_categories=self.max_categories
        )


def _configs(sources: tuple[str, ...], beam: tuple[str, ...] = ()) -> list[HistoriesConfig]:
    """Every source at every history length; those in ``beam`` build with Apache Beam."""
    return [
        HistoriesConfig(
            name=f"{source}_h{length}",
            description=f"{source}, history windows of up to {length} interactions",
            source=source,
            history_length=length,
            beam=source in beam,
        )
        for source in sources
        for length in HISTORY_LENGTHS
    ]


def features_dict(config: HistoriesConfig) -> tfds.features.FeaturesDict:
    """The TFDS features of one example (shapes from the config)."""
    length, genres = config.history_length, config.max_categories
    spec: dict[str, Any] = {
        k: tfds.features.Tensor(shape=(length,), dtype=d) for k, d in WINDOW.items()
    }
    spec["user_genres"] = tfds.features.Tensor(shape=(length, genres), dtype=np.int32)
    spec["user_item_titles"] = tfds.features.Sequence(tfds.features.Text(), length=length)
    spec.update({k: tfds.features.Scalar(dtype=d) for k, d in SCALARS.items()})
    spec["target_genres"] = tfds.features.Tensor(shape=(genres,), dtype=np.int32)
    spec.update({k: tfds.features.Text() for k in TEXTS})
    for prefix in F.CANDIDATE_PREFIXES.values():
        for key in ("candidate_item_index", "candidate_item_ids"):
            spec[prefix + key] = tfds.features.Tensor(shape=(NUM_CANDIDATES,), dtype=np.int32)
        spec[prefix + "candidate_label"] = tfds.features.Scalar(dtype=np.int32)
    return tfds.features.FeaturesDict(spec)


def split_examples(data: TaskData, split: str) -> dict[str, np.ndarray]:
    """Every example of a split as arrays with the TFDS feature names."""
    h = data.histories
    rows = h.splits[split]
    out = {k: np.asarray(rows[k], dtype=d) for k, d in {**WINDOW, **SCALARS}.items()}
    out["user_genres"] = np.asarray(rows["user_genres"], np.int32)
    out["target_genres"] = np.asarray(rows["target_genres"], np.int32)
    mask = np.asarray(rows["user_mask"], bool)
    out["user_item_titles"] = np.where(mask, h.item_titles[rows["user_item_index"]], "")
    out["target_title"] = np.asarray(rows["target_title"], dtype=object)
    out["favorite_genre"] = np.asarray(rows["favorite_genre"], dtype=object)
    out["review_text"] = np.asarray(data.review_texts[split], dtype=object)
    out["user_id"] = h.user_ids[rows["user_index"]].astype(object)
    for sampling, prefix in F.CANDIDATE_PREFIXES.items():
        out.update(F.candidate_sets(h, rows, data.negatives[sampling], prefix=prefix))
    return out


def catalogue(h: Histories | HistoryTables) -> dict[str, Any]:
    """The dataset metadata: what reads example ids back (titles, genre names, sizes). Its
    ``metadata.json`` is also a feature-sizes file (``feature_sizes.read``: the encoder's
    vocabulary sizes as gin macros, ``--gin.FEATURE_SIZES_FILE``)."""
    return {
        "history_length": int(h.config.max_history_length),
        "macros": FeatureSizes.from_histories(h).macros(),
        "item_ids": [str(x) for x in h.item_ids],
        "item_titles": [str(x) for x in h.item_titles],
        "genre_tokens": [str(x) for x in h.vocabularies["genre"].tokens],
        "vocabulary_sizes": {k: int(v.size) for k, v in h.vocabularies.items()},
        "num_time_buckets": int(h.config.num_time_buckets),
        "num_users_dropped": int(h.num_users_dropped),
    }


class _HistoriesBuilder(tfds.core.GeneratorBasedBuilder):
    """Shared by the three families: read, build histories, write one split per task split."""

    VERSION = VERSION
    RELEASE_NOTES = RELEASE_NOTES
    DATASET = ""  # ``readers.load`` name
    SOURCE_KW = ""  # the reader's keyword for one source ("categories", "states")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=features_dict(self.builder_config),
            metadata=tfds.core.MetadataDict(),
            homepage="https://arxiv.org/abs/2402.13598",
            # The histories' order (users, then time): the first N examples of a split are the
            # same users as in the reader-backed tasks, which evaluation relies on.
            disable_shuffling=True,
        )

    def _read(self, manual_dir: Path | None) -> tuple[HistoryTables, np.ndarray]:
        """The global pass over the release's files: (tables, review text of every row)."""
        c = self.builder_config
        if manual_dir is None:
            raise FileNotFoundError(
                f"{self.name}/{c.name}: no --manual_dir with the release files. "
                + self.MANUAL_DOWNLOAD_INSTRUCTIONS
            )
        kw = {self.SOURCE_KW: [c.source]} if self.SOURCE_KW and c.source != "all" else {}
        return read_tables(self.DATASET, str(manual_dir), c.history_config(), **kw)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        c = self.builder_config
        if c.beam:
            _require_beam(f"{self.name}/{c.name}")
        try:
            manual_dir = Path(dl_manager.manual_dir)
        except AssertionError:  # TFDS's check: none given, or an empty folder
            manual_dir = None
        tables, reviews = self._read(manual_dir)
        self.info.metadata.update(catalogue(tables))
        if not c.beam:
            data = task_data_from_tables(tables, reviews)
            return {s: self._generate_examples(split_examples(data, s)) for s in SPLITS}
        folder = epath.Path(dl_manager.download_dir) / "user_llm_shards" / self.name / c.name
        shards = write_shards(tables, reviews, folder, c.users_per_shard)
        return {s: _beam_examples(shards, s) for s in SPLITS}

    def _generate_examples(self, arrays: dict[str, np.ndarray]):
        for i in range(len(arrays["user_index"])):
            yield i, {k: v[i] for k, v in arrays.items()}


def _require_beam(name: str) -> None:
    try:
        import apache_beam  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"{name} builds with Apache Beam, which is not installed: pip install -e "
            '".[beam]" && pip install --no-deps apache-beam==2.77.0 (README, "Preprocessing '
            'at scale")'
        ) from e


# ---- the Beam path: the global pass writes shards of users, Beam runs the per-user pass ----
def write_shards(
    tables: HistoryTables, reviews: np.ndarray, folder: epath.Path, users_per_shard: int
) -> list[str]:
    """Writes the global tables once (without rows) and each shard's rows, their review texts
    and its first example's index in every split (``shard_*.pkl``); returns the shard paths, in
    user order. ``folder`` (one per builder and config) is emptied first, so one build of a
    config at a time per download folder; the tables file is named per build, so a worker that
    read an earlier build's tables (they are cached per process) never reuses them."""
    if users_per_shard < 1:
        raise ValueError(f"users_per_shard must be positive, got {users_per_shard}")
    if folder.exists():
        folder.rmtree()
    folder.mkdir(parents=True)
    per_user = tables.examples_per_user()
    first_example = {s: np.concatenate([[0], np.cumsum(n)]) for s, n in per_user.items()}
    tables_path = folder / f"tables_{uuid.uuid4().hex}.pkl"
    tables_path.write_bytes(pickle.dumps(dataclasses.replace(tables, rows=None, categories=None)))
    paths = []
    for lo in range(0, tables.num_users, users_per_shard):
        hi = min(lo + users_per_shard, tables.num_users)
        shard = tables.users(lo, hi)
        # The shard's review texts, by its rows: its ``rows.order`` then counts its own rows.
        shard_reviews = reviews[shard.rows.order]
        rows = dataclasses.replace(shard.rows, order=np.arange(len(shard.rows.order)))
        first = {s: int(first_example[s][lo]) for s in SPLITS}
        path = folder / f"shard_{lo:010d}.pkl"
        path.write_bytes(
            pickle.dumps((tables_path.name, rows, shard.categories, shard_reviews, first))
        )
        paths.append(str(path))
    return paths


@functools.lru_cache(maxsize=4)
def _global_tables(path: str) -> HistoryTables:
    return pickle.loads(epath.Path(path).read_bytes())


def shard_examples(path: str, split: str):
    """Yields (example index in the split, example) for one shard of users: the per-user pass."""
    tables_name, rows, categories, reviews, first = pickle.loads(epath.Path(path).read_bytes())
    tables = _global_tables(str(epath.Path(path).parent / tables_name))
    tables = dataclasses.replace(tables, rows=rows, categories=categories)
    arrays = split_examples(task_data_from_tables(tables, reviews, (split,)), split)
    for i in range(len(arrays["user_index"])):
        yield first[split] + i, {k: v[i] for k, v in arrays.items()}


def _beam_examples(shards: list[str], split: str):
    import apache_beam as beam

    return beam.Create(shards) | beam.FlatMap(shard_examples, split=split)


class UserLlmMovielens(_HistoriesBuilder):
    """MovieLens ratings as user history windows (``user_llm.data.readers.movielens``)."""

    DATASET = "movielens"
    BUILDER_CONFIGS = _configs(tuple(MOVIELENS_MD5), beam=("ml-20m", "ml-25m", "ml-latest"))
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place the GroupLens release (the folder or the .zip, e.g. ml-1m or ml-1m.zip) in the "
        "manual folder. ml-latest-small needs nothing: the bundled archive is used."
    )

    def _read(self, manual_dir: Path | None) -> tuple[HistoryTables, np.ndarray]:
        c = self.builder_config
        places = (manual_dir / c.source, manual_dir / f"{c.source}.zip") if manual_dir else ()
        found = [p for p in places if p.exists()]
        if not found and c.source != "ml-latest-small":
            raise FileNotFoundError(
                f"{c.source}: not in the manual folder ({manual_dir}) as a folder or .zip. "
                + self.MANUAL_DOWNLOAD_INSTRUCTIONS
            )
        return read_tables("movielens", str(found[0]) if found else None, c.history_config())


class UserLlmAmazonReviews(_HistoriesBuilder):
    """Amazon Reviews (2018 5-core or 2023) as user history windows."""

    DATASET = "amazon_reviews"
    SOURCE_KW = "categories"
    SOURCES = (
        "all",
        "All_Beauty",
        "Arts_Crafts_and_Sewing",
        "Automotive",
        "Baby_Products",
        "Beauty_and_Personal_Care",
        "Books",
        "CDs_and_Vinyl",
        "Cell_Phones_and_Accessories",
        "Clothing_Shoes_and_Jewelry",
        "Electronics",
        "Gift_Cards",
        "Grocery_and_Gourmet_Food",
        "Health_and_Household",
        "Home_and_Kitchen",
        "Industrial_and_Scientific",
        "Kindle_Store",
        "Magazine_Subscriptions",
        "Movies_and_TV",
        "Musical_Instruments",
        "Office_Products",
        "Patio_Lawn_and_Garden",
        "Pet_Supplies",
        "Software",
        "Sports_and_Outdoors",
        "Tools_and_Home_Improvement",
        "Toys_and_Games",
        "Video_Games",
    )
    # Full categories: the Beam path.
    BUILDER_CONFIGS = _configs(SOURCES, beam=SOURCES)
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place the category review files (2023: <Category>.jsonl; 2018: <Category>_5.json) "
        "and, for titles and categories, their meta_<Category> files in the manual folder."
    )


class UserLlmGoogleLocal(_HistoriesBuilder):
    """Google Local reviews (2021) as user history windows."""

    DATASET = "google_local"
    SOURCE_KW = "states"
    SOURCES = (
        "all",
        "Alabama",
        "Alaska",
        "Arizona",
        "California",
        "Colorado",
        "Florida",
        "Georgia",
        "Hawaii",
        "Illinois",
        "Massachusetts",
        "Michigan",
        "New_York",
        "Oregon",
        "Texas",
        "Washington",
    )
    # Every state (California alone holds ~70M reviews): the Beam path.
    BUILDER_CONFIGS = _configs(SOURCES, beam=SOURCES)
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place the state files (review-<State>.json and meta-<State>.json) in the manual folder."
    )
