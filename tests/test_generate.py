"""The compiled chunk/retrieve loop against plain Python references.

References decode one token at a time in Python: each next token comes from a full
teacher-forced pass (``Captioner.__call__``) whose chunk ``c`` sees the neighbours a numpy
brute-force search returns for the query ``E(text so far, image)``; no KV cache, no scan.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ravlm_jax.generate import (
    ExactRetriever,
    GenerateConfig,
    QueryText,
    ScannRetriever,
    _query_buckets,
    greedy_tokens,
    make_generator,
    neighbour_table_shardings,
    sample_logits,
)
from ravlm_jax.models.captioner import Captioner, CaptionerConfig
from ravlm_jax.models.decoder import Decoder, DecoderConfig
from ravlm_jax.models.dual_encoder import DualEncoder, DualEncoderConfig
from ravlm_jax.models.text import Bert, BertConfig
from ravlm_jax.models.vit import ViT, ViTConfig
from ravlm_jax.retrieval.index import ScannIndex

VOCAB, PAD, BOS, EOS = 64, 0, 1, 2
IDS = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD)
N_ROWS, GROUP, K, T, CL = 24, 3, 2, 7, 2


def random_params(factory, seed=0, std=0.3):
    """``factory()``'s module with numpy random parameters (norm scales around 1): abstract
    init, then filled. Eager random init compiles every small op and takes 10-100x longer;
    the larger-than-default std makes greedy outputs depend on image and neighbours."""
    graphdef, state = nnx.split(nnx.eval_shape(factory))
    rs = np.random.RandomState(seed)

    def fill(path, x):
        value = rs.normal(0.0, std, x.shape) + (1.0 if path[-1].key == "scale" else 0.0)
        return jnp.asarray(value, x.dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(
        fill, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


def tiny_captioner(seed=0, vocab=VOCAB, text_vocab=VOCAB, chunk_len=CL, copy_head=False,
                   dtype=jnp.float32, neighbour_layers=1, neighbour_next=False):
    def build():
        rngs = nnx.Rngs(seed)
        vit = ViT(ViTConfig(image_size=16, patch_size=8, width=16, layers=1, heads=2,
                            mlp_dim=32), rngs=rngs, dtype=dtype)
        bert = Bert(BertConfig(vocab_size=text_vocab, width=16, layers=1, heads=2, mlp_dim=32,
                               max_len=32), rngs=rngs, dtype=dtype)
        enc = DualEncoder(vit, bert, DualEncoderConfig(image_width=16, text_width=16,
                                                       embed_dim=8), rngs=rngs)
        dec = Decoder(DecoderConfig(vocab_size=vocab, n_positions=32, width=24, layers=2,
                                    heads=2, cross_attention=True, dtype=dtype), rngs=rngs)
        return Captioner(enc, dec, CaptionerConfig(image_width=16, k_max=4, neighbour_len=5,
                                                   chunk_len=chunk_len, copy_head=copy_head,
                                                   neighbour_layers=neighbour_layers,
                                                   neighbour_next=neighbour_next), rngs=rngs)

    return random_params(build, seed)


def make_store(seed=0, vocab=VOCAB):
    """24 unit vectors in groups of 3; rows 5 and 11 repeat row 2's caption (dedupe)."""
    rs = np.random.RandomState(seed)
    emb = rs.randn(N_ROWS, 8).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    tokens = rs.randint(3, vocab, (N_ROWS, 6)).astype(np.int32)
    tokens[:, 4:] = PAD
    tokens[[5, 11]] = tokens[2]
    return emb, tokens, np.arange(N_ROWS) // GROUP


@pytest.fixture(scope="module")
def model():
    return tiny_captioner()


@pytest.fixture(scope="module")
def store():
    return make_store()


@pytest.fixture(scope="module")
def exact(store):
    return ExactRetriever(store)


@pytest.fixture(scope="module")
def pixels():
    return np.random.RandomState(0).randn(3, 16, 16, 3).astype(np.float32)


EXCLUDE = np.array([0, 3, 7])


# ------------------------------------------------------------------ the Python reference


def forward_with_layout(model, ids, image_tokens, nb, nb_mask, chunk_of_pos):
    """Teacher forcing with an explicit position -> chunk map (the prompt's layout)."""
    b, c, k, ln = nb.shape
    t = ids.shape[1]
    image_mem = model.image_memory(image_tokens)  # [B, Ti, W]
    nb_mem = model.neighbour_memory(nb.reshape(b * c, k, ln), nb_mask.reshape(b * c, k, ln))
    memory = jnp.concatenate([image_mem, nb_mem.reshape(b, c * k * ln, -1)], 1)
    own = chunk_of_pos[:, None] == jnp.arange(c)[None, :]  # [T, C]
    nb_valid = nb_mask.reshape(b, c, k * ln).astype(bool)
    see = (own[None, :, :, None] & nb_valid[:, None]).reshape(b, t, c * k * ln)
    mask = jnp.concatenate([jnp.ones((b, t, image_mem.shape[1]), bool), see], -1)
    return model.decoder(ids, memory=memory, memory_mask=mask)[0]


@functools.partial(jax.jit, static_argnums=0)
def _teacher_forced(graphdef, state, *args):
    return nnx.merge(graphdef, state)(*args)


@functools.partial(jax.jit, static_argnums=0)
def _teacher_forced_layout(graphdef, state, *args):
    return forward_with_layout(nnx.merge(graphdef, state), *args)


@functools.partial(jax.jit, static_argnums=0)
def _image_features(graphdef, state, pixels):
    encoder = nnx.merge(graphdef, state).encoder
    tokens, pooled = encoder.image_features(pixels)
    return tokens, encoder.embed_image_pooled(pooled)


@functools.partial(jax.jit, static_argnums=0)
def _text_query(graphdef, state, u_img, ids):
    encoder = nnx.merge(graphdef, state).encoder
    u_txt = encoder.encode_text(ids, jnp.ones_like(ids))
    return encoder.fuse(u_img, u_txt, jnp.ones((1,), bool))


WIDTH = 16  # the reference's fixed input length: one compile for every test


class Reference:
    """Plain Python decoding: numpy retrieval, one teacher-forced pass per token."""

    def __init__(self, model, store, k, chunk_len, max_len, query_ids=None):
        self.model, self.k, self.cl, self.t = model, k, chunk_len, max_len
        self.emb, self.tokens, self.groups = store
        self.query_ids = query_ids or (lambda text: [BOS] + list(text) + [EOS])
        self.graphdef, self.state = nnx.split(model)

    def features(self, pixels):
        return _image_features(self.graphdef, self.state, pixels)

    def retrieve(self, u_img, text, exclude):
        """-> neighbour rows: best first, own group and repeated captions skipped."""
        if self.k == 0:
            return []
        q = u_img[None]
        if text:
            ids = np.asarray(self.query_ids(text), np.int32)[None]
            q = _text_query(self.graphdef, self.state, q, ids)
        scores = self.emb @ np.asarray(q[0], np.float64)
        picked, seen = [], set()
        for row in np.argsort(-scores, kind="stable"):
            caption = tuple(t for t in self.tokens[row] if t != PAD)
            if self.groups[row] == exclude or caption in seen:
                continue
            seen.add(caption)
            picked.append(int(row))
            if len(picked) == self.k:
                break
        return picked

    def next_logp(self, image_tokens, u_img, tokens, exclude, prompt=()):
        """log p(next | BOS, prompt, tokens). The input at position m sees chunk
        ``max(m - P, 0) // cl``, chunk c retrieved with prompt + tokens[:c * cl] (with no
        prompt: the captioner's teacher-forcing layout, ``Captioner.__call__``)."""
        ids = [BOS] + list(prompt) + list(tokens)
        width = WIDTH
        chunks = -(-width // self.cl)
        ln = self.model.config.neighbour_len
        nb = np.zeros((1, chunks, self.k, ln), np.int32)
        used = []
        for c in range(len(tokens) // self.cl + 1):
            rows = self.retrieve(u_img, list(prompt) + list(tokens[:c * self.cl]), exclude)
            used.append(rows)
            for j, row in enumerate(rows):
                nb[0, c, j] = self.tokens[row][:ln]
        padded = np.full((1, width), PAD, np.int32)
        padded[0, :len(ids)] = ids
        nb_mask = (nb != PAD).astype(np.int32)
        if prompt or self.cl != self.model.config.chunk_len:
            chunk_of_pos = np.maximum(np.arange(width) - len(prompt), 0) // self.cl
            logits = _teacher_forced_layout(self.graphdef, self.state, padded,
                                            image_tokens[None], nb, nb_mask, chunk_of_pos)
        else:
            logits = _teacher_forced(self.graphdef, self.state, padded, image_tokens[None], nb,
                                     nb_mask)
        return np.asarray(jax.nn.log_softmax(logits[0, len(ids) - 1])), used

    def greedy(self, pixels, exclude):
        image_tokens, u_img = self.features(pixels)
        out = []
        for b in range(pixels.shape[0]):
            tokens, score = [], 0.0
            while len(tokens) < self.t:
                logp, used = self.next_logp(image_tokens[b], u_img[b], tokens, exclude[b])
                tokens.append(int(np.argmax(logp)))
                score += float(logp[tokens[-1]])
                if tokens[-1] == EOS:
                    break
            out.append((tokens, used, score))
        return out

    def beam(self, pixels, exclude, beams, length_penalty):
        image_tokens, u_img = self.features(pixels)
        out = []
        for b in range(pixels.shape[0]):
            alive, finished = [((), 0.0)], []
            for step in range(self.t):
                cands = []
                for tokens, score in alive:
                    logp = self.next_logp(image_tokens[b], u_img[b], tokens, exclude[b])[0]
                    for v in np.argsort(-logp)[:2 * beams]:
                        cands.append((tokens + (int(v),), score + float(logp[v])))
                cands = sorted(cands, key=lambda c: -c[1])[:2 * beams]
                finished += [(t, s / (step + 1) ** length_penalty) for t, s in cands
                             if t[-1] == EOS]
                finished = sorted(finished, key=lambda c: -c[1])[:beams]
                alive = [c for c in cands if c[0][-1] != EOS][:beams]
            pool = finished + [(t, s / self.t ** length_penalty) for t, s in alive]
            out.append(max(pool, key=lambda c: c[1]))
        return out


def row_tokens(out, b):
    return [int(t) for t in out.tokens[b, :out.lengths[b]]]


# ------------------------------------------------------------------ tests


def test_greedy_loop_equals_step_by_step_python_reference(model, store, exact, pixels):
    gen = make_generator(model, exact, dict(strategy="greedy", max_len=T, **IDS), k=K)
    out = gen(pixels, exclude_group_ids=EXCLUDE)
    ref = Reference(model, store, K, CL, T).greedy(pixels, EXCLUDE)
    chunks = -(-T // CL)
    assert out.tokens.shape == (3, T) and out.neighbour_ids.shape == (3, chunks, K)
    for b, (tokens, used, score) in enumerate(ref):
        assert row_tokens(out, b) == tokens
        assert out.scores[b] == pytest.approx(score, abs=1e-4)  # sum of log p
        # neighbours of every chunk the reference reached, -1 after the row finished
        for c in range(chunks):
            want = used[c] if c < len(used) else [-1] * K
            assert out.neighbour_ids[b, c].tolist() == want, (b, c)
        rows = out.neighbour_ids[b][out.neighbour_ids[b] >= 0]
        assert not np.any(store[2][rows] == EXCLUDE[b])  # never the query's own group
    # the test exercises re-retrieval: some row's neighbours change between chunks
    assert any(len({tuple(r) for r in out.neighbour_ids[b] if r[0] >= 0}) > 1
               for b in range(3))
    assert len({tuple(row_tokens(out, b)) for b in range(3)}) > 1


def test_bfloat16_loop_equals_python_reference(store, exact, pixels):
    """bf16 compute (bf16 caches, float32 attention and logits): the cached loop decodes the
    same tokens as teacher forcing, with the same neighbours."""
    model = tiny_captioner(dtype=jnp.bfloat16)
    out = make_generator(model, exact, dict(strategy="greedy", max_len=T, **IDS), k=K)(
        pixels, exclude_group_ids=EXCLUDE)
    for b, (tokens, used, score) in enumerate(
            Reference(model, store, K, CL, T).greedy(pixels, EXCLUDE)):
        assert row_tokens(out, b) == tokens
        assert out.scores[b] == pytest.approx(score, rel=1e-2)  # bf16 rounding, summed
        assert out.neighbour_ids[b, :len(used)].tolist() == used
    assert len({tuple(row_tokens(out, b)) for b in range(3)}) > 1


def test_copy_head_loop_equals_python_reference(store, exact, pixels):
    """The pointer-generator output (copying retrieved tokens) is what the loop decodes
    with, greedy and beam, re-retrieving every chunk."""
    model = tiny_captioner(copy_head=True)
    ref = Reference(model, store, K, CL, T)
    out = make_generator(model, exact, dict(strategy="greedy", max_len=T, **IDS), k=K)(
        pixels, exclude_group_ids=EXCLUDE)
    for b, (tokens, _, score) in enumerate(ref.greedy(pixels, EXCLUDE)):
        assert row_tokens(out, b) == tokens
        assert out.scores[b] == pytest.approx(score, abs=1e-4)
    out = make_generator(model, exact, dict(strategy="beam", num_beams=2, max_len=T, **IDS),
                         k=K)(pixels, exclude_group_ids=EXCLUDE)
    for b, (tokens, score) in enumerate(ref.beam(pixels, EXCLUDE, 2, 1.0)):
        assert row_tokens(out, b) == list(tokens)
        assert out.scores[b] == pytest.approx(score, abs=1e-4)


@pytest.mark.slow
def test_neighbour_tables_loop_equals_python_reference_and_follow_new_parameters(
        store, exact, pixels):
    """Linear neighbour memory: each chunk's K/V are gathered from per-vocabulary tables
    built once per parameter set; tokens equal the reference and the per-chunk projection,
    and replacing the parameters rebuilds the tables."""
    model = tiny_captioner(seed=4, neighbour_layers=0, neighbour_next=True, copy_head=True)
    cfg = dict(strategy="greedy", max_len=T, **IDS)
    gen = make_generator(model, exact, cfg, k=K)
    projecting = make_generator(model, exact, cfg, k=K, neighbour_table_mib=0)
    out = gen(pixels, exclude_group_ids=EXCLUDE)
    assert gen._tables is not None and projecting._tables is None
    assert gen.keeps_neighbour_tables and not projecting.keeps_neighbour_tables
    ref = Reference(model, store, K, CL, T).greedy(pixels, EXCLUDE)
    for b, (tokens, _used, score) in enumerate(ref):
        assert row_tokens(out, b) == tokens
        assert out.scores[b] == pytest.approx(score, rel=1e-4, abs=1e-4)
    want = projecting(pixels, exclude_group_ids=EXCLUDE)
    np.testing.assert_array_equal(out.tokens, want.tokens)
    np.testing.assert_allclose(out.scores, want.scores, rtol=1e-5, atol=1e-5)
    tables = gen._tables[1]
    gen(pixels, exclude_group_ids=EXCLUDE)
    assert gen._tables[1] is tables  # same parameters: reused
    nnx.update(model, jax.tree.map(lambda x: x * 1.5, nnx.state(model, nnx.Param)))
    out2, want2 = gen(pixels, exclude_group_ids=EXCLUDE), projecting(pixels,
                                                                    exclude_group_ids=EXCLUDE)
    assert gen._tables[1] is not tables
    np.testing.assert_array_equal(out2.tokens, want2.tokens)
    np.testing.assert_allclose(out2.scores, want2.scores, rtol=1e-5, atol=1e-5)
    assert not np.allclose(out2.scores, out.scores)
    assert gen.traces == 1


def test_prompt_continues_the_prefix_and_joins_the_query(model, store, exact, pixels):
    prompt = np.array([[7, 9, 11], [5, 0, 0], [8, 13, 0]], np.int32)
    mask = (prompt != 0).astype(np.int32)
    gen = make_generator(model, exact, dict(strategy="greedy", max_len=5, **IDS), k=K)
    out = gen(pixels, prompt_ids=prompt, prompt_mask=mask, exclude_group_ids=EXCLUDE)
    ref = Reference(model, store, K, CL, 5)
    image_tokens, u_img = ref.features(pixels)
    for b in range(3):
        p = tuple(int(t) for t in prompt[b, :mask[b].sum()])
        tokens = []
        while len(tokens) < 5 and (not tokens or tokens[-1] != EOS):
            logp, _ = ref.next_logp(image_tokens[b], u_img[b], tokens, EXCLUDE[b], prompt=p)
            tokens.append(int(np.argmax(logp)))
        assert row_tokens(out, b) == tokens
        # chunk 0 is retrieved with E(prompt, image)
        assert out.neighbour_ids[b, 0].tolist() == ref.retrieve(u_img[b], list(p), EXCLUDE[b])


def test_chunk_longer_than_output_equals_retrieve_once(model, store, exact, pixels):
    gen = make_generator(model, exact, dict(strategy="greedy", max_len=T, **IDS), k=K,
                         chunk_len=100)
    out = gen(pixels, exclude_group_ids=EXCLUDE)
    assert out.neighbour_ids.shape == (3, 1, K)
    ref = Reference(model, store, K, 100, T).greedy(pixels, EXCLUDE)
    for b, (tokens, used, score) in enumerate(ref):
        assert row_tokens(out, b) == tokens
        assert out.scores[b] == pytest.approx(score, abs=1e-4)  # sum of log p
        assert [out.neighbour_ids[b, 0].tolist()] == used


def test_scann_and_exact_backends_agree_when_scann_is_exact(model, store, exact, pixels):
    index = ScannIndex.build(store[0], mode="brute_force")
    scann = ScannRetriever(index, store[1], store[2])
    cfg = dict(strategy="greedy", max_len=T, **IDS)
    a = make_generator(model, exact, cfg, k=K)(pixels, exclude_group_ids=EXCLUDE)
    b = make_generator(model, scann, cfg, k=K)(pixels, exclude_group_ids=EXCLUDE)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.neighbour_ids, b.neighbour_ids)
    np.testing.assert_allclose(a.neighbour_scores, b.neighbour_scores, atol=1e-5)
    assert scann.calls > 0


def test_beam_search_equals_python_reference(model, store, exact, pixels):
    gen = make_generator(model, exact, dict(strategy="beam", num_beams=3, length_penalty=0.8,
                                            max_len=5, **IDS), k=K)
    out = gen(pixels, exclude_group_ids=EXCLUDE)
    ref = Reference(model, store, K, CL, 5).beam(pixels, EXCLUDE, 3, 0.8)
    for b, (tokens, score) in enumerate(ref):
        assert row_tokens(out, b) == list(tokens)
        np.testing.assert_allclose(out.scores[b], score, rtol=1e-4, atol=1e-4)


def test_sampling_is_reproducible_and_respects_its_filters(model, exact, pixels):
    cfg = dict(strategy="sample", max_len=T, temperature=1.0, **IDS)
    gen = make_generator(model, exact, cfg, k=K)
    a = gen(pixels, jax.random.key(1))
    b = gen(pixels, jax.random.key(1))
    c = gen(pixels, jax.random.key(2))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    assert gen.traces == 1
    with pytest.raises(ValueError, match="explicit PRNG key"):
        gen(pixels)


def test_sample_logits_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 2000)
    draw = lambda **kw: np.asarray(jax.vmap(lambda key: sample_logits(logits, key, **kw))(keys))
    assert set(np.unique(draw(top_p=0.7))) == {0, 1}  # 0.5 + 0.3 reaches 0.7
    assert set(np.unique(draw(top_k=3))) == {0, 1, 2}
    assert set(np.unique(draw(top_p=0.4))) == {0}
    assert set(np.unique(draw(top_k=1))) == {0}
    np.testing.assert_allclose(np.bincount(draw().ravel(), minlength=4) / 2000,
                               [0.5, 0.3, 0.15, 0.05], atol=0.04)
    assert int(sample_logits(logits, keys[0], temperature=0.0)[0]) == 0


def test_greedy_tokens_equal_argmax_ties_included():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 1000)).astype(np.float32)
    logits[1, [3, 700]] = 9.0  # a tie: the first index wins, as in argmax
    logits[2] = -np.inf
    logits[3, :] = 0.5
    logits = np.round(logits, 1)  # many ties below the maximum
    np.testing.assert_array_equal(np.asarray(jax.jit(greedy_tokens)(logits)),
                                  np.argmax(logits, -1))
    vocab_major = jax.jit(functools.partial(greedy_tokens, axis=0))(logits.T)  # [V, N]
    np.testing.assert_array_equal(np.asarray(vocab_major), np.argmax(logits, -1))


def test_query_lengths_are_each_boundarys_text_without_padding():
    # 24 tokens in chunks of 4: boundaries hold 4, 8, .., 20 ids -> [CLS] ids [SEP]
    assert _query_buckets(26, "same", [4, 8, 12, 16, 20]) == [6, 10, 14, 18, 22, 26]
    assert _query_buckets(12, "map", [4, 8, 12, 16]) == [6, 10, 12]  # capped by the tower
    many = list(range(1, 40))  # chunk_len 1: too many branches -> powers of two
    assert _query_buckets(41, "same", many) == [8, 16, 32, 41]
    assert _query_buckets(26, "host", [4, 8]) == [26]
    assert _query_buckets(26, "same", [4, 8], most=1) == [26]


def test_one_query_length_pads_and_decodes_the_same(model, exact, pixels):
    cfg = dict(strategy="greedy", max_len=T, **IDS)
    want = make_generator(model, exact, cfg, k=K)(pixels, exclude_group_ids=EXCLUDE)
    got = make_generator(model, exact, cfg, k=K, query_lengths=1)(
        pixels, exclude_group_ids=EXCLUDE)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.neighbour_ids, want.neighbour_ids)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-5)


def test_k0_decodes_against_the_image_only(model, store, pixels):
    gen = make_generator(model, None, dict(strategy="greedy", max_len=T, **IDS), k=0)
    out = gen(pixels)
    assert out.neighbour_ids.shape == (3, -(-T // CL), 0)
    ref = Reference(model, store, 0, CL, T).greedy(pixels, EXCLUDE)
    for b, (tokens, *_) in enumerate(ref):
        assert row_tokens(out, b) == tokens
    # cached image features work too (no image tower in the program)
    tokens = model.encoder.image_tokens(pixels)
    np.testing.assert_array_equal(gen(tokens).tokens, out.tokens)


def test_compiles_once_per_shape_and_follows_new_parameters(store, pixels):
    model = tiny_captioner(seed=3)
    exact = ExactRetriever(store)
    cfg = dict(strategy="greedy", max_len=4, **IDS)
    gen = make_generator(model, exact, cfg, k=1)
    first = gen(pixels)
    gen(pixels + 1.0)
    again = make_generator(model, exact, cfg, k=1)
    again(pixels)
    assert gen.traces == 1 and again.traces == 1
    # parameters are arguments, not constants: changing them changes the output
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x * 1.5, params))
    assert not np.array_equal(gen(pixels).scores, first.scores)
    assert gen.traces == 1


def test_runs_sharded_on_8_devices(model, store, exact, pixels, mesh8):
    """2x2x2 mesh: batch over (data, fsdp), the datastore's rows over all 8 devices."""
    cfg = dict(strategy="greedy", max_len=T, **IDS)
    want = make_generator(model, exact, cfg, k=K)(pixels, exclude_group_ids=EXCLUDE)
    sharded = make_generator(model, ExactRetriever(store, mesh8), cfg, k=K, mesh=mesh8)
    got = sharded(pixels, exclude_group_ids=EXCLUDE)  # batch 3 -> padded to the mesh
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.neighbour_ids, want.neighbour_ids)


@pytest.mark.slow
@pytest.mark.parametrize("neighbour_layers", [1, 0])  # 0: K/V tables, split by heads
def test_copy_head_beam_search_runs_sharded(store, exact, pixels, mesh8, neighbour_layers):
    model = tiny_captioner(copy_head=True, neighbour_layers=neighbour_layers)
    beam = dict(strategy="beam", num_beams=2, max_len=T, **IDS)
    want = make_generator(model, exact, beam, k=K)(pixels, exclude_group_ids=EXCLUDE)
    gen = make_generator(model, ExactRetriever(store, mesh8), beam, k=K, mesh=mesh8)
    got = gen(pixels, exclude_group_ids=EXCLUDE)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-4)
    if neighbour_layers == 0:  # each device holds its heads' half of every table
        keys = gen._tables[1][0][0]  # layer 0, key tables
        assert keys.table.sharding.spec == jax.sharding.PartitionSpec(None, "model")
        assert keys.table.addressable_shards[0].data.shape == (VOCAB, 24 // 2)
        assert keys.next is None and keys.pos.addressable_shards[0].data.shape[1] == 12


def test_neighbour_table_size_limit_is_per_device(store, exact, mesh8):
    """A cap between the tables' per-device share and their whole size keeps them only on
    a mesh that splits them."""
    model = tiny_captioner(neighbour_layers=0)
    mib = model.neighbour_tables_mib()
    shardings, parts = neighbour_table_shardings(model, mesh8)
    assert parts == 2  # the tiny decoder's 2 heads over model=2
    assert shardings[1][0].table.spec == jax.sharding.PartitionSpec(None, "model")
    cap = dict(strategy="greedy", max_len=T, neighbour_table_mib=0.75 * mib, **IDS)
    assert not make_generator(model, exact, cap, k=K).keeps_neighbour_tables
    assert make_generator(model, ExactRetriever(store, mesh8), cap, k=K,
                          mesh=mesh8).keeps_neighbour_tables


@pytest.mark.slow
def test_beam_search_with_the_scann_callback_runs_sharded(model, store, exact, pixels,
                                                          mesh8):
    scann = ScannRetriever(ScannIndex.build(store[0], mode="brute_force"), store[1], store[2])
    beam = dict(strategy="beam", num_beams=3, length_penalty=0.8, max_len=5, **IDS)
    got = make_generator(model, scann, beam, k=K, mesh=mesh8)(pixels, exclude_group_ids=EXCLUDE)
    want = make_generator(model, exact, beam, k=K)(pixels, exclude_group_ids=EXCLUDE)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.neighbour_ids, want.neighbour_ids)


def test_scann_callback_searches_per_device_shard(store, mesh8):
    scann = ScannRetriever(ScannIndex.build(store[0], mode="brute_force"), store[1], store[2])
    seen = []
    original = scann.host_search

    def spy(q, ex, k):
        seen.append(q.shape[0])
        return original(q, ex, k)

    scann.host_search = spy
    q = jax.device_put(jnp.asarray(store[0][:8]), jax.sharding.NamedSharding(
        mesh8, jax.sharding.PartitionSpec(("data", "fsdp", "model"))))
    ex = jnp.full((8,), -2, jnp.int32)
    with jax.set_mesh(mesh8):
        found = jax.block_until_ready(
            jax.jit(lambda q, e: scann.search({}, q, e, 3, mesh8))(q, ex))
    assert seen == [1] * 8  # eight devices, one row each: nothing gathered to one device
    np.testing.assert_array_equal(np.asarray(found.ids)[:, 0], np.arange(8))
    np.testing.assert_array_equal(np.asarray(found.tokens[:, 0]), store[1][:8])


@pytest.mark.slow
def test_query_text_is_retokenized_when_the_vocabularies_differ(store):
    """GPT-2 decoder + BERT text tower: the query text is decoded with GPT-2's tokenizer and
    re-encoded with BERT's, inside the loop, exactly as the reference does it on the host."""
    from ravlm_jax.data.tokenizers import get_tokenizer

    gpt2, bert = get_tokenizer("gpt2"), get_tokenizer("bert")
    model = tiny_captioner(seed=1, vocab=gpt2.vocab_size, text_vocab=bert.vocab_size)
    query = QueryText("gpt2", "bert", GenerateConfig(**IDS))
    assert query.mode == "host"
    text = np.array([gpt2.encode(" a red apple")[:3] + [0] * 3], np.int32)
    ids, mask = query.host(text, np.array([3]), 16)
    want_ids, want_mask = bert.encode_batch([gpt2.decode(text[0, :3])], 16)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask, want_mask)

    emb, _, groups = store
    rs = np.random.RandomState(1)
    tokens = rs.randint(0, 50000, (N_ROWS, 6)).astype(np.int32)
    tokens[:, 4:] = PAD
    cfg = dict(strategy="greedy", max_len=5, tokenizer="gpt2", text_tokenizer="bert",
               **IDS)
    gen = make_generator(model, ExactRetriever((emb, tokens, groups)), cfg, k=K)
    pixels = np.random.RandomState(0).randn(2, 16, 16, 3).astype(np.float32)
    out = gen(pixels)

    def query_ids(text):
        return bert.encode_batch([gpt2.decode(np.asarray(text))], 16)[0][0].tolist()

    def bert_query(text):  # what the loop feeds: padded to its static length
        ids = query_ids(text)
        return ids[:int(np.sum(np.asarray(ids) != bert.pad_id))]

    ref = Reference(model, (emb, tokens, groups), K, CL, 5, query_ids=bert_query)
    for b, (want, *_) in enumerate(ref.greedy(pixels, [-1, -1])):
        assert row_tokens(out, b) == want


def test_bad_settings_are_one_line_errors(model, exact, pixels):
    cfg = dict(strategy="greedy", max_len=T, **IDS)
    with pytest.raises(ValueError, match="k_max"):
        make_generator(model, exact, cfg, k=9)
    with pytest.raises(ValueError, match="needs a retriever"):
        make_generator(model, None, cfg, k=2)
    with pytest.raises(ValueError, match="strategy"):
        make_generator(model, exact, dict(cfg, strategy="nucleus"), k=2)
    with pytest.raises(ValueError, match="n_positions"):
        make_generator(model, exact, dict(cfg, max_len=40), k=2)(pixels)
    with pytest.raises(ValueError, match="pooled"):
        make_generator(model, exact, cfg, k=2)(model.encoder.image_tokens(pixels))


def test_config_from_a_run_config():
    from ravlm_jax.config import load_config

    config = load_config("configs/tiny.py")
    cfg = GenerateConfig.from_config(config)
    assert (cfg.strategy, cfg.max_len, cfg.tokenizer, cfg.text_tokenizer) == (
        "greedy", 12, "bert", "bert")
    from ravlm_jax.data.tokenizers import get_tokenizer

    cfg = cfg.with_ids_of(get_tokenizer(cfg.tokenizer))
    assert (cfg.bos_id, cfg.eos_id, cfg.pad_id) == (101, 102, 0)  # [CLS], [SEP], [PAD]
    beam = GenerateConfig.from_config(config.generate, strategy="beam")
    assert beam.beams == config.generate.num_beams


def test_query_text_of_a_subset_vocabulary_is_mapped_in_the_graph():
    """A decoder over a subset of BERT's word pieces: ids map back through ``to_base`` and
    the query is [CLS] words [SEP] in BERT ids, as BERT's tokenizer would give."""
    from ravlm_jax.data.tokenizers import get_tokenizer

    bert = get_tokenizer("bert")
    words = bert.encode("a red apple on a plate", add_special_tokens=False)

    class Subset:  # the interface of data.tokenizers.SubsetTokenizer that generation uses
        base, name = bert, "bert[subset]"

    sub = Subset()
    sub.to_base = np.array(sorted({bert.pad_id, bert.bos_id, bert.eos_id, *words}), np.int32)
    sub.bos_id, sub.eos_id, sub.pad_id = (int(np.flatnonzero(sub.to_base == i)[0])
                                          for i in (bert.bos_id, bert.eos_id, bert.pad_id))
    cfg = GenerateConfig(tokenizer="bert").with_ids_of(sub)
    query = QueryText(sub, bert, cfg)
    assert query.mode == "map"
    ours = np.searchsorted(sub.to_base, words)  # the words in subset ids
    text = np.zeros((1, 10), np.int32)
    text[0, :len(ours)] = ours
    ids, mask = query(jnp.asarray(text), jnp.array([len(ours)]), 12,
                      jnp.asarray(sub.to_base), None)
    want_ids, want_mask = bert.encode_batch(["a red apple on a plate"], 12)
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    np.testing.assert_array_equal(np.asarray(mask), want_mask)
    assert QueryText("bert", "bert", GenerateConfig(**IDS)).mode == "same"


def test_a_run_with_its_own_decoder_vocabulary_needs_its_tokenizer(model, exact):
    with pytest.raises(ValueError, match="pass tokenizer="):
        make_generator(model, exact, dict(decoder_vocab="train", **IDS), k=K)
