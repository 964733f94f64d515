"""The title-feature encoder's frozen table, from the real SmolLM2 and ml-latest-small."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_title_table_rows_follow_the_item_vocabulary_of_the_real_data(tmp_path):
    from user_llm import (
        evaluate,  # noqa: F401  (importing both defines no flag twice)
        item_text_table,
    )
    from user_llm.import_checkpoint import import_checkpoint, packaged_gguf

    llm = import_checkpoint(tmp_path / "smollm2", gguf=packaged_gguf())
    table = item_text_table.build_table("movielens", 50, llm)  # the CLI's work, in process
    from user_llm.data import families

    h = families.family_histories("movielens", 50)
    sizes = families.feature_sizes(families.MOVIELENS, 50)
    assert table.shape == (sizes.item, 576) and table.dtype == np.float32
    np.testing.assert_array_equal(table[:2], 0.0)  # pad and OOV
    rms = np.sqrt(np.mean(np.square(table[2:]), axis=1))
    np.testing.assert_allclose(rms, 1.0, atol=1e-4)
    # Vocabulary ids and item indices name the same movies in every training history.
    titles = h.vocabulary_titles()
    train = h.splits["train"]
    ids, index = np.asarray(train["user_item_ids"]), np.asarray(train["user_item_index"])
    known = ids > 1
    assert known.sum() > 10_000
    np.testing.assert_array_equal(titles[ids[known]], h.item_titles[index[known]])
    # Rows are the titles' own: a sequel's nearest title is its first film.
    unit = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-6)
    sequel = list(titles).index("Terminator 2: Judgment Day (1991)")
    nearest = titles[np.argsort(-(unit @ unit[sequel]))[1:4]]
    assert "Terminator, The (1984)" in nearest, nearest
