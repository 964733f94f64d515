"""Every registered User-LLM task builds batches of the right shapes through its converter;
absent data fails with a message naming the env var; the README's custom-task snippet works."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from user_llm.data import families

seqio = pytest.importorskip("seqio")

from tasks import (  # noqa: E402
    amazon_reviews,
    google_local,
    movielens,
)
from tests.conftest import REPO_ROOT  # noqa: E402
from tests.data.datagen import write_json_lines  # noqa: E402
from user_llm.data import pipeline  # noqa: E402
from user_llm.models import ARUserEncoderModel, check_input_features  # noqa: E402
from user_llm.user_encoder import UserEncoder, UserEncoderConfig  # noqa: E402

FAMILIES = (movielens.FAMILY, amazon_reviews.FAMILY, google_local.FAMILY)
TEXT_LENGTHS = {"inputs": 64, "targets": 16}
BATCH = 2


def write_google_local(folder) -> None:
    """6 users x 8 reviews of 12 places with names, categories and review text."""
    reviews, metas = [], []
    for p in range(12):
        metas.append(dict(name=f"Place {p}", gmap_id=f"p{p}", category=[f"Cat{p % 3}", "Food"]))
    for u in range(6):
        for k in range(8):
            p = (u * 5 + k * 7) % 12
            reviews.append(
                dict(user_id=f"u{u}", name="A", time=(1_600_000_000 + 1000 * k + u) * 1000,
                     rating=1 + (u + k) % 5, text=f"review {u}-{k}", gmap_id=f"p{p}")
            )  # fmt: skip
    write_json_lines(folder / "review-Vermont.json.gz", reviews, gz=True)
    write_json_lines(folder / "meta-Vermont.json.gz", metas, gz=True)


@pytest.fixture(scope="module")
def google_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("google_local")
    write_google_local(folder)
    old = os.environ.get(google_local.FAMILY.env_var)
    os.environ[google_local.FAMILY.env_var] = str(folder)
    yield folder
    if old is None:
        os.environ.pop(google_local.FAMILY.env_var, None)
    else:
        os.environ[google_local.FAMILY.env_var] = old


def our_tasks() -> list[str]:
    """The byte-vocabulary tasks the family modules register on import (not the tokenizer or
    TFDS variants other tests register in the same worker: ``*_smollm2``, ``*_tfds``)."""
    return sorted(n for m in (movielens, amazon_reviews, google_local) for n in m.TASK_NAMES)


def family_of(name: str) -> families.Family:
    return next(f for f in FAMILIES if name.startswith(f.name + "_"))


def test_names_are_systematic():
    names = set(our_tasks())
    for f in FAMILIES:
        for length in f.history_lengths:
            assert f"{f.name}_encoder_pretrain_h{length}" in names
            for form in ("userllm", "tp"):
                assert f"{f.name}_next_item_{form}_h{length}" in names
                assert f"{f.name}_{f.favorite_name}_{form}_h{length}" in names
    assert "movielens_favorite_genre_userllm_h50" in names
    assert "amazon_reviews_review_gen_userllm_h20" in names
    assert "google_local_review_gen_tp_h200" in names
    assert not any(n.startswith("movielens_review_gen") for n in names)
    for n in names:
        assert re.fullmatch(r"[a-z_]+_h\d+", n), n


def test_families_are_known_by_name_and_a_name_is_never_taken_twice():
    assert [families.by_name(f.name) for f in FAMILIES] == list(FAMILIES)
    with pytest.raises(families.errors.ConfigError, match="Unknown dataset 'netflix'.*movielens"):
        families.by_name("netflix")
    impostor = families.dataclasses.replace(families.MOVIELENS, env_var="OTHER_DIR")
    with pytest.raises(ValueError, match="already named 'movielens'"):
        families.register(impostor)
    families.register(families.MOVIELENS)  # the same family again: harmless
    # One task-name pattern for tasks, encoder pretraining and mixtures.
    assert (
        families.task_name("movielens", "next_item", "tp", 50, "_x")
        == "movielens_next_item_tp_h50_x"
    )
    assert (
        families.task_name("movielens", "encoder_pretrain", None, 20)
        == "movielens_encoder_pretrain_h20"
    )
    assert families.task_name("amazon_reviews", None, "userllm", 20) == "amazon_reviews_userllm_h20"


def converter_for(name: str) -> str:
    if "_encoder_pretrain_" in name:
        return "user_features"
    return "user_prefix_lm" if "_userllm_" in name else "prefix_lm"


@pytest.mark.parametrize(
    "history_length",
    [20] + [pytest.param(n, marks=pytest.mark.slow) for n in families.DEFAULT_HISTORY_LENGTHS[1:]],
)
def test_every_present_task_yields_batches(google_dir, history_length):
    """Each task of one history length (about 1 s of tf.data setup per task)."""
    del google_dir
    checked = 0
    for name in our_tasks():
        family = family_of(name)
        length = int(name.rsplit("_h", 1)[1])
        if length != history_length or not families.data_available(family):
            continue
        conv = converter_for(name)
        lengths = {} if conv == "user_features" else dict(TEXT_LENGTHS)
        cfg = pipeline.DatasetConfig(
            name, lengths, split="validation", batch_size=BATCH, shuffle=False, converter=conv
        )
        batch = next(pipeline.numpy_batches(pipeline.get_dataset(cfg, num_epochs=1)))
        seq = sum(lengths.values())
        user_len = length + 1 if conv == "user_features" else length
        expected = {}
        if conv != "user_features":
            for k in ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
                      "decoder_causal_attention"):  # fmt: skip
                expected[k] = (BATCH, seq)
        if conv != "prefix_lm":
            for k in ("user_item_ids", "user_ratings", "user_time_buckets", "user_mask"):
                expected[k] = (BATCH, user_len)
            expected["user_genres"] = (BATCH, user_len, 6)
        assert {k: v.shape for k, v in batch.items()} == expected, name
        assert all(v.dtype == np.int32 for v in batch.values()), name
        if conv != "user_features":
            assert batch["decoder_loss_weights"].sum() > 0, name
        if conv != "prefix_lm":
            assert batch["user_mask"].sum() > 0, name
            # The encoder that the model gins size from this family's data reads only what
            # its tasks give.
            sizes = families.feature_sizes(family, length)
            encoder = UserEncoderConfig(
                categorical_features=tuple(sizes.categorical().items()),
                multivalued_features=tuple(sizes.multivalued().items()),
            )
            check_input_features(ARUserEncoderModel(UserEncoder(encoder)), batch, name)
        checked += 1
    # MovieLens (5 tasks) and Google Local (7, the test's files) always; Amazon if present.
    assert checked >= 5 + 7


def test_train_split_and_candidates_through_converter(google_dir):
    del google_dir
    cfg = pipeline.DatasetConfig(
        "google_local_next_item_userllm_h20", TEXT_LENGTHS, split="test", batch_size=2,
        shuffle=False, converter="user_prefix_lm",
        passthrough_features=("candidate_item_index", "candidate_label"),
    )  # fmt: skip
    batch = next(pipeline.numpy_batches(pipeline.get_dataset(cfg, num_epochs=1)))
    assert batch["candidate_item_index"].shape == (2, 20)
    assert batch["candidate_label"].shape == (2,)
    cfg = pipeline.DatasetConfig(
        "movielens_encoder_pretrain_h20", {}, split="train", batch_size=4, converter="user_features"
    )
    batch = next(pipeline.numpy_batches(pipeline.get_dataset(cfg, num_epochs=None)))
    assert batch["user_item_ids"].shape == (4, 21)


def test_missing_data_dir_names_the_env_var(monkeypatch, tmp_path):
    monkeypatch.delenv("USER_LLM_GOOGLE_LOCAL_DIR", raising=False)
    assert not families.data_available(google_local.FAMILY)
    with pytest.raises(families.MissingDataError, match="USER_LLM_GOOGLE_LOCAL_DIR"):
        seqio.get_mixture_or_task("google_local_next_item_tp_h20").get_dataset(
            TEXT_LENGTHS, "validation"
        )
    monkeypatch.setenv("USER_LLM_AMAZON_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(families.MissingDataError, match="USER_LLM_AMAZON_DIR.*|nowhere"):
        seqio.get_mixture_or_task("amazon_reviews_review_gen_userllm_h20").get_dataset(
            TEXT_LENGTHS, "validation"
        )


def test_register_tasks_with_another_vocabulary_and_suffix():
    import tasks

    names = tasks.register_tasks(seqio.ByteVocabulary(), name_suffix="_bytes2")
    assert "movielens_next_item_userllm_h50_bytes2" in names
    assert "google_local_review_gen_tp_h20_bytes2" in seqio.TaskRegistry.names()
    again = tasks.register_tasks(seqio.ByteVocabulary(), name_suffix="_bytes2")  # idempotent
    assert again == names


def test_readme_snippet_registers_a_working_task():
    """The README's "Add your own dataset or task" code, run as a new user would."""
    readme = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    in_readme = [b for b in blocks if "movielens_likes_next_userllm_h20" in b]
    assert in_readme, "README.md lost its custom-task example"
    code = in_readme[0]
    if "movielens_likes_next_userllm_h20" not in seqio.TaskRegistry.names():
        exec(compile(code, "README snippet", "exec"), {"__name__": "readme_snippet"})
    cfg = pipeline.DatasetConfig(
        "movielens_likes_next_userllm_h20", {"inputs": 48, "targets": 8}, split="validation",
        batch_size=4, shuffle=False, converter="user_prefix_lm",
    )  # fmt: skip
    batch = next(pipeline.numpy_batches(pipeline.get_dataset(cfg, num_epochs=1)))
    assert batch["decoder_input_tokens"].shape == (4, 56)
    assert batch["user_genres"].shape == (4, 20, 6)
    targets = seqio.ByteVocabulary().decode(
        [
            int(t)
            for t, w in zip(
                batch["decoder_target_tokens"][0], batch["decoder_loss_weights"][0], strict=True
            )
            if w
        ]  # fmt: skip
    )
    assert targets in ("yes", "no")
