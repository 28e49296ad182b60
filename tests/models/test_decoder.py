"""Decoder: config, reduced cross-attention shapes, KV cache == full forward (jit and scan),
padding, memory swaps, the zero tanh gate, dropout, input checks, partition-spec snapshot
and the sharded forward on the 2x2x2 mesh. HF / SmallCap parity lives in
tests/checkpoints/test_gpt2.py and test_smallcap.py."""

import functools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ravlm_jax.checkpoints.io import path_key
from ravlm_jax.models.decoder import Decoder, DecoderConfig, KVCache, MemoryKV
from ravlm_jax.sharding import batch_sharding, named_specs, shard_module

GOLDEN_SPECS = Path(__file__).parent / "golden" / "decoder_specs.json"
TINY = dict(vocab_size=99, n_positions=64, width=32, layers=2, heads=4)
CROSS = dict(TINY, cross_attention=True, cross_attention_reduce_factor=4, memory_width=24)


@functools.cache
def _cached(seed: int, items: tuple) -> Decoder:
    return Decoder(DecoderConfig(**dict(items)), rngs=nnx.Rngs(seed))


def _decoder(seed: int = 0, **kw) -> Decoder:
    """Modules are immutable in these tests: build each config once per session."""
    return _cached(seed, tuple(sorted(kw.items())))


@nnx.jit
def _fwd(dec, ids, memory=None, memory_kv=None, memory_mask=None, attention_mask=None,
         cache=None):
    """One compiled forward (eager dispatch of every small op is slower on CPU)."""
    return dec(ids, memory=memory, memory_kv=memory_kv, memory_mask=memory_mask,
               attention_mask=attention_mask, cache=cache)


def _ids(b: int, t: int, seed: int = 1) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (b, t), 0, TINY["vocab_size"])


def _memory(b: int, m: int = 5, width: int = 24, seed: int = 2) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (b, m, width))


def _step(dec, ids, memory_kv, cache, attention_mask=None):
    return _fwd(dec, ids, memory_kv=memory_kv, cache=cache, attention_mask=attention_mask)


def _incremental(dec, ids, memory_kv, prefill: int, max_len: int = 16, attention_mask=None):
    """Prefill ``prefill`` tokens, then one token per jitted call; concatenated logits."""
    b, t = ids.shape
    mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask
    cache = dec.init_cache(b, max_len)
    logits, cache = _step(dec, ids[:, :prefill], memory_kv, cache, mask[:, :prefill])
    out = [logits]
    for i in range(prefill, t):
        logits, cache = _step(dec, ids[:, i:i + 1], memory_kv, cache, mask[:, i:i + 1])
        out.append(logits)
    return jnp.concatenate(out, axis=1), cache


# --------------------------------------------------------------------------- config


def test_config_defaults_and_from_hf():
    cfg = DecoderConfig(**TINY)
    assert (cfg.mlp_dim, cfg.memory_width, cfg.head_dim, cfg.cross_width) == (128, 32, 8, 32)
    hf = dict(model_type="this_gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=99,
              n_positions=64, n_inner=None, add_cross_attention=True,
              cross_attention_reduce_factor=4, tie_word_embeddings=True)
    got = DecoderConfig.from_hf(hf, memory_width=24, tie_word_embeddings=False)
    assert got == DecoderConfig(**CROSS, tie_word_embeddings=False)
    assert DecoderConfig.from_hf(dict(hf, model_type="gpt2")).memory_width == 32


@pytest.mark.parametrize("kw, match", [
    (dict(heads=5), "divisible"),
    (dict(cross_attention_reduce_factor=3), "reduce_factor"),
    (dict(cross_attention_reduce_factor=16), "reduce_factor"),  # 2 wide: not 4 heads
    (dict(gate="sigmoid"), "gate"),
    (dict(dropout=1.0), "dropout"),
    (dict(act="nope"), "activation"),
])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        DecoderConfig(**{**TINY, **kw})


def test_from_hf_rejects_other_models_and_unsupported_scaling():
    base = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=99)
    with pytest.raises(ValueError, match="model_type"):
        DecoderConfig.from_hf(dict(base, model_type="bert"))
    with pytest.raises(ValueError, match="inverse_layer_idx"):
        DecoderConfig.from_hf(dict(base, scale_attn_by_inverse_layer_idx=True))


def test_reduced_cross_attention_shapes():
    dec = _decoder(**CROSS)
    attn = dec.blocks[0].cross_attn
    shapes = {n: getattr(attn, n).kernel.get_value().shape for n in ("query", "key", "value",
                                                                      "out")}
    assert shapes == {"query": (32, 8), "key": (24, 8), "value": (24, 8), "out": (8, 32)}
    assert (attn.num_heads, attn.head_dim) == (4, 2)
    kv = dec.encode_memory(_memory(3))
    assert isinstance(kv, MemoryKV) and len(kv.keys) == len(kv.values) == 2
    assert kv.keys[0].shape == kv.values[1].shape == (3, 4, 5, 2)  # [B, H, M, D]
    logits, cache = _fwd(dec, _ids(3, 6), memory_kv=kv)
    assert logits.shape == (3, 6, 99) and logits.dtype == jnp.float32 and cache is None


# --------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("cross", [False, True])
def test_kv_cache_incremental_equals_full_forward(cross):
    dec = _decoder(**(CROSS if cross else TINY))
    ids = _ids(2, 10)
    kv = dec.encode_memory(_memory(2)) if cross else None
    full, _ = _fwd(dec, ids, memory_kv=kv)
    inc, cache = _incremental(dec, ids, kv, prefill=4)
    np.testing.assert_allclose(np.asarray(inc), np.asarray(full), atol=1e-5)
    assert int(cache.index) == 10 and cache.positions.tolist() == [10, 10]
    assert cache.keys[0].shape == (2, 4, 16, 8)  # [B, H, S, D]


def test_kv_cache_decodes_inside_lax_scan():
    dec = _decoder(**CROSS)
    ids, kv = _ids(2, 9), dec.encode_memory(_memory(2))
    full, _ = _fwd(dec, ids, memory_kv=kv)
    graphdef, state = nnx.split(dec)

    @jax.jit
    def decode(state, ids, kv):
        model = nnx.merge(graphdef, state)
        prefill, cache = model(ids[:, :3], memory_kv=kv, cache=model.init_cache(2, 12))

        def step(cache, token):  # token [B]
            logits, cache = nnx.merge(graphdef, state)(token[:, None], memory_kv=kv,
                                                       cache=cache)
            return cache, logits[:, 0]

        cache, rest = jax.lax.scan(step, cache, ids[:, 3:].T)  # rest [T - 3, B, V]
        return jnp.concatenate([prefill, rest.transpose(1, 0, 2)], axis=1), cache

    inc, cache = decode(state, ids, kv)
    np.testing.assert_allclose(np.asarray(inc), np.asarray(full), atol=1e-5)
    assert isinstance(cache, KVCache) and int(cache.index) == 9


def test_left_padded_batch_matches_unpadded_rows():
    """Row 1 is left-padded by 3: its real tokens get positions 0.. and ignore the padding,
    with and without the cache."""
    dec = _decoder(**CROSS)
    ids, mem = _ids(2, 10), _memory(2)
    mask = jnp.ones((2, 10), bool).at[1, :3].set(False)
    kv = dec.encode_memory(mem)
    full, _ = _fwd(dec, ids, memory_kv=kv, attention_mask=mask)
    inc, cache = _incremental(dec, ids, kv, prefill=5, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(inc)[np.asarray(mask)],
                               np.asarray(full)[np.asarray(mask)], atol=1e-5)
    alone, _ = _fwd(dec, ids[1:, 3:], memory=mem[1:])
    np.testing.assert_allclose(np.asarray(full[1, 3:]), np.asarray(alone[0]), atol=1e-5)
    assert cache.positions.tolist() == [10, 7] and int(cache.index) == 10


def test_right_padding_only_changes_padded_rows():
    dec = _decoder(**TINY)
    ids = _ids(2, 8)
    mask = jnp.ones((2, 8), bool).at[0, 5:].set(False)
    padded, _ = _fwd(dec, ids, attention_mask=mask)
    plain, _ = _fwd(dec, ids)
    np.testing.assert_allclose(np.asarray(padded[0, :5]), np.asarray(plain[0, :5]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(padded[1]), np.asarray(plain[1]), atol=1e-6)


def test_memory_swap_between_chunks_keeps_the_self_attention_cache():
    """Chunk 1 against memory A, chunk 2 against memory B: a chunk call and token-by-token
    calls agree, chunk 1 equals the full pass with A, and B really is used."""
    dec = _decoder(**CROSS)
    ids = _ids(2, 10)
    kv_a, kv_b = dec.encode_memory(_memory(2, seed=3)), dec.encode_memory(_memory(2, seed=4))
    cache = dec.init_cache(2, 16)
    first, cache = _step(dec, ids[:, :6], kv_a, cache)
    chunk, after_chunk = _step(dec, ids[:, 6:], kv_b, cache)
    steps, c = [], cache
    for i in range(6, 10):
        logits, c = _step(dec, ids[:, i:i + 1], kv_b, c)
        steps.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(chunk),
                               atol=1e-5)
    full_a, _ = _fwd(dec, ids, memory_kv=kv_a)
    np.testing.assert_allclose(np.asarray(first), np.asarray(full_a[:, :6]), atol=1e-5)
    assert np.abs(np.asarray(chunk) - np.asarray(full_a[:, 6:])).max() > 1e-3
    assert int(after_chunk.index) == 10


def test_cache_select_reorders_rows():
    dec = _decoder(**TINY)
    ids = _ids(3, 4)
    _, cache = _fwd(dec, ids, cache=dec.init_cache(3, 8))
    rows = jnp.array([2, 2, 0])
    picked = cache.select(rows)
    np.testing.assert_array_equal(np.asarray(picked.keys[1]), np.asarray(cache.keys[1])[rows])
    assert int(picked.index) == 4 and picked.valid.shape == (3, 8)
    nxt = _ids(3, 1, seed=9)
    got, _ = _fwd(dec, nxt, cache=picked)
    want, _ = _fwd(dec, jnp.concatenate([ids[rows], nxt], 1))
    np.testing.assert_allclose(np.asarray(got[:, 0]), np.asarray(want[:, -1]), atol=1e-5)


def test_cache_overflow_gives_nan_not_silent_overwrite():
    dec = _decoder(**TINY)
    logits, cache = _fwd(dec, _ids(1, 4), cache=dec.init_cache(1, 4))
    assert np.isfinite(np.asarray(logits)).all()
    logits, _ = _fwd(dec, _ids(1, 1), cache=cache)
    assert np.isnan(np.asarray(logits)).all()


# --------------------------------------------------------------------------- gate, dropout


def test_tanh_gate_at_init_is_the_plain_lm_and_gets_gradients():
    gated = _decoder(**CROSS, gate="tanh")
    plain = _decoder(**TINY)
    shared = {path_key(p): v for p, v in nnx.to_flat_state(nnx.state(gated))}
    graphdef, state = nnx.split(plain)
    leaves = [(p, v.replace(shared[path_key(p)].get_value()))
              for p, v in nnx.to_flat_state(state)]
    plain = nnx.merge(graphdef, nnx.from_flat_state(leaves))
    ids, mem = _ids(2, 7), _memory(2)
    with_memory, _ = _fwd(gated, ids, memory=mem)
    without, _ = _fwd(plain, ids)
    np.testing.assert_array_equal(np.asarray(with_memory), np.asarray(without))

    def loss(model):
        return model(ids, memory=mem)[0].mean()

    grads = nnx.jit(nnx.grad(loss))(gated)
    assert float(jnp.abs(grads.blocks[0].cross_gate.get_value())) > 0


def test_dropout_only_when_not_deterministic():
    dec = _decoder(**TINY, dropout=0.5)
    ids = _ids(2, 6)
    a, _ = dec(ids)
    b, _ = dec(ids, deterministic=True)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c, _ = dec(ids, deterministic=False, rngs=nnx.Rngs(dropout=0))
    assert np.abs(np.asarray(c) - np.asarray(a)).max() > 1e-3
    with pytest.raises(ValueError, match="rngs"):
        dec(ids, deterministic=False)


def test_bfloat16_compute_keeps_float32_logits_and_bf16_cache():
    f32 = _decoder(**CROSS)
    bf16 = nnx.merge(nnx.graphdef(_decoder(**CROSS, dtype=jnp.bfloat16)), nnx.state(f32))
    ids, mem = _ids(2, 6), _memory(2)
    want, _ = _fwd(f32, ids, memory=mem)
    got, _ = _fwd(bf16, ids, memory=mem)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=0.05)
    cache = bf16.init_cache(2, 8)
    assert cache.keys[0].dtype == jnp.bfloat16
    _, cache = _fwd(bf16, ids, memory=mem, cache=cache)
    assert cache.keys[0].dtype == jnp.bfloat16 and cache.valid.dtype == jnp.bool_


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_one_line_errors():
    plain, cross = _decoder(**TINY), _decoder(**CROSS)
    ids = _ids(2, 4)
    with pytest.raises(ValueError, match="no cross-attention"):
        plain(ids, memory=_memory(2))
    with pytest.raises(ValueError, match="not both"):
        cross(ids, memory=_memory(2), memory_kv=cross.encode_memory(_memory(2)))
    with pytest.raises(ValueError, match=r"\[B, M, 24\]"):
        cross(ids, memory=_memory(2, width=32))
    with pytest.raises(ValueError, match="batch"):
        cross(ids, memory=_memory(3))
    with pytest.raises(ValueError, match="memory_mask"):
        cross(ids, memory=_memory(2), memory_mask=jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="n_positions"):
        plain(_ids(1, 65))
    with pytest.raises(ValueError, match="max_len"):
        plain.init_cache(1, 65)
    with pytest.raises(ValueError, match="cache is for batch"):
        plain(ids, cache=plain.init_cache(3, 8))
    with pytest.raises(ValueError, match="ids must be"):
        plain(ids[0])


def test_memory_mask_hides_memory_slots():
    dec = _decoder(**CROSS)
    ids, mem = _ids(2, 5), _memory(2, m=6)
    mask = jnp.ones((2, 6), bool).at[:, 4:].set(False)
    masked, _ = _fwd(dec, ids, memory=mem, memory_mask=mask)
    truncated, _ = _fwd(dec, ids, memory=mem[:, :4])
    np.testing.assert_allclose(np.asarray(masked), np.asarray(truncated), atol=1e-6)


# --------------------------------------------------------------------------- sharding


def test_partition_specs_match_golden(mesh8):
    """Every parameter's logical axes and mesh spec; regenerate deliberately with
    RAVLM_UPDATE_GOLDEN=1 when the layout is meant to change."""
    dec = nnx.eval_shape(lambda: _decoder(**CROSS, gate="tanh", tie_word_embeddings=False))
    specs = named_specs(dec, mesh8)
    if os.environ.get("RAVLM_UPDATE_GOLDEN") == "1":
        GOLDEN_SPECS.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN_SPECS.write_text(json.dumps(specs, indent=1, sort_keys=True) + "\n")
    assert specs == json.loads(GOLDEN_SPECS.read_text())


@pytest.mark.slow  # ~7 s idle, 20 s on a loaded 2-core machine: three mesh compiles
def test_sharded_forward_and_cache_equal_single_device(mesh8):
    dec = _decoder(**CROSS, tie_word_embeddings=False)
    ids, mem = _ids(4, 8), _memory(4)
    want_full, _ = _fwd(dec, ids, memory=mem)
    _, cache = _fwd(dec, ids[:, :5], memory=mem, cache=dec.init_cache(4, 8))
    want_step, _ = _fwd(dec, ids[:, 5:6], memory=mem, cache=cache)
    sharded = shard_module(dec, mesh8)
    assert sharded.blocks[0].mlp.fc1.kernel.get_value().sharding.spec == P("fsdp", "model")
    ids = jax.device_put(ids, batch_sharding(mesh8, 2))
    mem = jax.device_put(mem, batch_sharding(mesh8, 3))

    @nnx.jit
    def run(model, ids, mem):
        kv = model.encode_memory(mem)
        full, _ = model(ids, memory_kv=kv)
        _, cache = model(ids[:, :5], memory_kv=kv, cache=model.init_cache(4, 8))
        step, _ = model(ids[:, 5:6], memory_kv=kv, cache=cache)
        return full, step

    with jax.set_mesh(mesh8):
        full, step = run(sharded, ids, mem)
    np.testing.assert_allclose(np.asarray(full), np.asarray(want_full), atol=1e-5)
    np.testing.assert_allclose(np.asarray(step), np.asarray(want_step), atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_vocab_major_logits_are_the_transposed_head(tied, dtype):
    dec = _decoder(tie_word_embeddings=tied, dtype=dtype, **TINY)
    if not tied:  # a bias, which GPT-2's head lacks, to check it lands on the vocabulary
        dec = nnx.clone(dec)
        dec.lm_head.bias = nnx.data(nnx.Param(jnp.arange(TINY["vocab_size"], dtype=jnp.float32)))
    hidden = jax.random.normal(jax.random.key(0), (5, TINY["width"]), dtype)  # [N, W]
    want = jax.jit(lambda h: dec.logits(h[:, None])[:, 0])(hidden)  # [N, V]
    got = jax.jit(dec.vocab_major_logits)(hidden)  # [V, N]
    assert got.shape == (TINY["vocab_size"], 5) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got).T, np.asarray(want), rtol=1e-6, atol=1e-6)
