"""The captioning step's loss and neighbour sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ravlm_jax.train.steps import caption_loss_fn, sample_neighbours


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


def test_lm_loss_weight_adds_the_lm_heads_own_cross_entropy(monkeypatch):
    """With a copy head, ``lm_loss_weight`` adds CE(LM head) to CE(mixture); the
    mixture's term alone is the loss at weight 0."""
    import optax

    from tests.models.test_captioner import VOCAB, tiny_captioner

    model = tiny_captioner(neighbour_layers=0, copy_head=True, k_max=4)
    rs = np.random.RandomState(0)
    n, t, c, k, ln, rows = 3, 7, 3, 4, 5, 10
    tables = {
        "count": np.ones((n,), np.int32),
        "dec_ids": rs.randint(1, VOCAB, (n, 1, t + 1)).astype(np.int32),
        "dec_mask": np.ones((n, 1, t + 1), np.int32),
        "image_tokens": rs.randn(n, 4, 16).astype(np.float32),
        "neighbours": np.tile(np.arange(k, dtype=np.int32), (n, 1, c, 1)) + np.arange(
            n, dtype=np.int32)[:, None, None, None],
        "payload_ids": rs.randint(1, VOCAB, (rows, ln)).astype(np.int32),
        "payload_mask": np.ones((rows, ln), np.int32),
    }
    batch = {"source_id": np.arange(n)}
    rng = jax.random.key(3)
    kw = dict(k_max=4, k_dropout=0.0, neighbour_dropout=0.0)
    both, _ = caption_loss_fn(**kw, lm_loss_weight=1.0)(model, batch, tables, rng)
    mix, _ = caption_loss_fn(**kw)(model, batch, tables, rng)
    # the LM head's CE by hand: the same neighbours and dropout draws (same rng), lm logits
    captured = {}
    call = type(model).__call__

    def spy(self, *args, **kwargs):
        out = call(self, *args, **kwargs)
        captured["lm"] = out[1]
        return out

    monkeypatch.setattr(type(model), "__call__", spy)
    caption_loss_fn(**kw, lm_loss_weight=1.0)(model, batch, tables, rng)
    targets = tables["dec_ids"][:, 0, 1:]
    lm = float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(captured["lm"],
                                                                        targets)))
    assert float(both) == pytest.approx(float(mix) + lm, rel=1e-5)
    assert float(both) > float(mix)
