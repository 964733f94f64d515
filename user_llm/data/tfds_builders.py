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

Large releases (ml-25m, full Amazon categories) are built the same way, in memory on one
machine (as training reads them); TFDS's Apache Beam path is not used yet.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from user_llm.data import features as F
from user_llm.data.histories import SPLITS, HistoryConfig
from user_llm.data.readers.download import MOVIELENS_MD5
from user_llm.data.task_data import TaskData, build_task_data

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

    def history_config(self) -> HistoryConfig:
        return HistoryConfig(
            max_history_length=self.history_length, max_categories=self.max_categories
        )


def _configs(sources: tuple[str, ...]) -> list[HistoriesConfig]:
    return [
        HistoriesConfig(
            name=f"{source}_h{length}",
            description=f"{source}, history windows of up to {length} interactions",
            source=source,
            history_length=length,
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


def catalogue(data: TaskData) -> dict[str, Any]:
    """The dataset metadata: what reads example ids back (titles, genre names, sizes)."""
    h = data.histories
    return {
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

    def _task_data(self, manual_dir: Path | None) -> TaskData:
        c = self.builder_config
        if manual_dir is None:
            raise FileNotFoundError(
                f"{self.name}/{c.name}: no --manual_dir with the release files. "
                + self.MANUAL_DOWNLOAD_INSTRUCTIONS
            )
        kw = {self.SOURCE_KW: [c.source]} if self.SOURCE_KW and c.source != "all" else {}
        return build_task_data(self.DATASET, str(manual_dir), c.history_config(), **kw)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        try:
            manual_dir = Path(dl_manager.manual_dir)
        except AssertionError:  # TFDS's check: none given, or an empty folder
            manual_dir = None
        data = self._task_data(manual_dir)
        self.info.metadata.update(catalogue(data))
        return {s: self._generate_examples(split_examples(data, s)) for s in SPLITS}

    def _generate_examples(self, arrays: dict[str, np.ndarray]):
        for i in range(len(arrays["user_index"])):
            yield i, {k: v[i] for k, v in arrays.items()}


class UserLlmMovielens(_HistoriesBuilder):
    """MovieLens ratings as user history windows (``user_llm.data.readers.movielens``)."""

    DATASET = "movielens"
    BUILDER_CONFIGS = _configs(tuple(MOVIELENS_MD5))
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place the GroupLens release (the folder or the .zip, e.g. ml-1m or ml-1m.zip) in the "
        "manual folder. ml-latest-small needs nothing: the bundled archive is used."
    )

    def _task_data(self, manual_dir: Path | None) -> TaskData:
        c = self.builder_config
        places = (manual_dir / c.source, manual_dir / f"{c.source}.zip") if manual_dir else ()
        found = [p for p in places if p.exists()]
        if not found and c.source != "ml-latest-small":
            raise FileNotFoundError(
                f"{c.source}: not in the manual folder ({manual_dir}) as a folder or .zip. "
                + self.MANUAL_DOWNLOAD_INSTRUCTIONS
            )
        return build_task_data("movielens", str(found[0]) if found else None, c.history_config())


class UserLlmAmazonReviews(_HistoriesBuilder):
    """Amazon Reviews (2018 5-core or 2023) as user history windows."""

    DATASET = "amazon_reviews"
    SOURCE_KW = "categories"
    BUILDER_CONFIGS = _configs((
        "all", "All_Beauty", "Arts_Crafts_and_Sewing", "Automotive", "Baby_Products",
        "Beauty_and_Personal_Care", "Books", "CDs_and_Vinyl", "Cell_Phones_and_Accessories",
        "Clothing_Shoes_and_Jewelry", "Electronics", "Gift_Cards", "Grocery_and_Gourmet_Food",
        "Health_and_Household", "Home_and_Kitchen", "Industrial_and_Scientific", "Kindle_Store",
        "Magazine_Subscriptions", "Movies_and_TV", "Musical_Instruments", "Office_Products",
        "Patio_Lawn_and_Garden", "Pet_Supplies", "Software", "Sports_and_Outdoors",
        "Tools_and_Home_Improvement", "Toys_and_Games", "Video_Games",
    ))  # fmt: skip
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place the category review files (2023: <Category>.jsonl; 2018: <Category>_5.json) "
        "and, for titles and categories, their meta_<Category> files in the manual folder."
    )


class UserLlmGoogleLocal(_HistoriesBuilder):
    """Google Local reviews (2021) as user history windows."""

    DATASET = "google_local"
    SOURCE_KW = "states"
    BUILDER_CONFIGS = _configs((
        "all", "Alabama", "Alaska", "Arizona", "California", "Colorado", "Florida", "Georgia",
        "Hawaii", "Illinois", "Massachusetts", "Michigan", "New_York", "Oregon", "Texas",
        "Washington",
    ))  # fmt: skip
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place the state files (review-<State>.json and meta-<State>.json) in the manual folder."
    )
