"""Neighbour sampling of the captioning step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ravlm_jax.train.steps import sample_neighbours


@pytest.mark.parametrize("top_k", [3, 8, 12])
def test_sample_neighbours_shows_rank_ordered_candidates(top_k):
    b, c, k_max = 64, 2, 8
    cands = jnp.asarray(np.arange(b * c * top_k).reshape(b, c, top_k), jnp.int32)
    shown = np.asarray(sample_neighbours(jax.random.key(0), cands, k_max, 0.25, 0.0))
    assert shown.shape == (b, c, k_max)
    rank = np.where(shown >= 0, shown % top_k, -1)  # candidate rank of each shown row
    assert np.array_equal(rank[:, 0], rank[:, 1])  # the same ranks in every chunk
    none = np.all(shown < 0, axis=(1, 2))
    assert 0 < none.mean() < 0.6  # k_dropout: some examples see no neighbour
    for row, cand in zip(shown[:, 0], np.asarray(cands)[:, 0], strict=True):
        real = row[row >= 0]
        assert np.all(np.isin(real, cand)) and np.all(np.diff(real) > 0)  # rank order
        assert np.all(row[len(real):] < 0)  # empty slots only after the shown ones
    assert (shown[:, 0] >= 0).sum(axis=1).max() == min(top_k, k_max)
