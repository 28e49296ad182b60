"""Building blocks shared by every tower: linear, embedding, layer norm, MLP, attention.

Every parameter is an ``nnx.Param`` carrying ``logical_axes`` metadata (see
``ravlm_jax.sharding``). Kernels are stored ``[in, out]`` (the Flax convention; Hugging Face
``nn.Linear`` weights are transposed by the loaders, GPT-2 ``Conv1D`` ones are not).
Parameters are float32; ``dtype`` is the compute dtype (bfloat16 on TPU). Layer norms and
softmax always run in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ravlm_jax.sharding import LOGICAL_AXES_KEY, constrain

Axes = tuple[str | None, ...]
DType = jnp.dtype | type


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], axes: Axes,
          dtype: DType = jnp.float32) -> nnx.Param:
    """An ``nnx.Param`` with logical axis names. Loaders build modules under
    ``nnx.eval_shape`` and fill them from checkpoints, so no random init runs for them."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {tuple(shape)}")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), **{LOGICAL_AXES_KEY: tuple(axes)})


normal = jax.nn.initializers.normal
zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones


class Linear(nnx.Module):
    """``y = x @ kernel + bias`` with kernel ``[in, out]``."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs,
                 axes: Axes = (None, None), use_bias: bool = True, init_std: float = 0.02,
                 dtype: DType = jnp.float32):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.kernel = param(rngs, normal(init_std), (in_features, out_features), axes)
        self.bias = param(rngs, zeros, (out_features,), axes[-1:]) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), kernel)  # [..., in] -> [..., out]
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token or position embedding ``[num, features]``; ``attend`` is the tied output head."""

    def __init__(self, num: int, features: int, *, rngs: nnx.Rngs,
                 axes: Axes = ("vocab", "embed"), init_std: float = 0.02,
                 dtype: DType = jnp.float32):
        self.num, self.features, self.dtype = num, features, dtype
        self.embedding = param(rngs, normal(init_std), (num, features), axes)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)  # [..., features]

    def attend(self, x: jax.Array) -> jax.Array:
        emb = self.embedding[...].astype(self.dtype)
        return jnp.einsum("...d,vd->...v", x.astype(self.dtype), emb)  # [..., num]


class LayerNorm(nnx.Module):
    def __init__(self, features: int, *, rngs: nnx.Rngs, eps: float = 1e-5,
                 axes: Axes = ("embed",), dtype: DType = jnp.float32):
        self.eps, self.dtype = eps, dtype
        self.scale = param(rngs, ones, (features,), axes)
        self.bias = param(rngs, zeros, (features,), axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu": exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # GPT-2: tanh form
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


class MLP(nnx.Module):
    """Two-layer feed-forward block: embed -> mlp -> embed."""

    def __init__(self, features: int, hidden: int, act: str, *, rngs: nnx.Rngs,
                 dtype: DType = jnp.float32, init_std: float = 0.02):
        self.fc1 = Linear(features, hidden, axes=("embed", "mlp"), rngs=rngs, dtype=dtype,
                          init_std=init_std)
        self.fc2 = Linear(hidden, features, axes=("mlp", "embed"), rngs=rngs, dtype=dtype,
                          init_std=init_std)
        self.act = activation(act)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.act(self.fc1(x))  # [B, T, mlp]
        h = constrain(h, ("batch", "length", "mlp"))
        return self.fc2(h)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array | None = None, scale: float | None = None,
                          bias: jax.Array | None = None, kv_heads_major: bool = False
                          ) -> jax.Array:
    """Softmax attention in float32.

    q: [B, Tq, H, D]; k, v: [B, Tk, H, D], or [B, H, Tk, D] with ``kv_heads_major`` (the
    layout of decoding caches: a one-token query then reads K/V without transposing them
    at every step, which XLA:CPU otherwise does); mask: bool, broadcastable to
    [B, H, Tq, Tk] (True = attend); bias: additive, same broadcast. Returns [B, Tq, H, D].
    Rows whose mask is all False return zeros instead of NaN (padded memory, padded
    queries).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kv = "bhkd" if kv_heads_major else "bkhd"
    logits = jnp.einsum(f"bqhd,{kv}->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    logits = logits * scale  # [B, H, Tq, Tk]
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        probs = jnp.where(mask.any(-1, keepdims=True), probs, 0.0)
    out = jnp.einsum(f"bhqk,{kv}->bqhd", probs, v.astype(jnp.float32))  # [B, Tq, H, D]
    return out.astype(v.dtype)


class Attention(nnx.Module):
    """Multi-head attention with separate q/k/v/out projections.

    ``inner`` may be smaller than the query width (SmallCap's reduced cross-attention:
    inner = n_embd / reduce_factor, heads keep their count and shrink in width).
    Fused checkpoint layouts (GPT-2 ``c_attn``) are split by the loaders.
    """

    def __init__(self, q_features: int, kv_features: int, num_heads: int, *,
                 rngs: nnx.Rngs, inner: int | None = None, out_features: int | None = None,
                 use_bias: bool = True, dtype: DType = jnp.float32, init_std: float = 0.02,
                 out_init_std: float | None = None):
        inner = q_features if inner is None else inner
        out_features = q_features if out_features is None else out_features
        if inner % num_heads:
            raise ValueError(f"attention width {inner} not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, inner // num_heads
        lin = dict(rngs=rngs, use_bias=use_bias, dtype=dtype, init_std=init_std)
        self.query = Linear(q_features, inner, axes=("embed", "heads"), **lin)
        self.key = Linear(kv_features, inner, axes=("embed", "heads"), **lin)
        self.value = Linear(kv_features, inner, axes=("embed", "heads"), **lin)
        lin["init_std"] = init_std if out_init_std is None else out_init_std
        self.out = Linear(inner, out_features, axes=("heads", "embed"), **lin)

    def _split(self, x: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        x = x.reshape(b, t, self.num_heads, self.head_dim)  # [B, T, inner] -> [B, T, H, D]
        return constrain(x, ("batch", "length", "heads", "kv"))

    def project_query(self, x: jax.Array) -> jax.Array:
        return self._split(self.query(x))  # [B, Tq, H, D]

    def project_kv(self, memory: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, Tk, kv_features] -> (k, v) each [B, Tk, H, D]; cacheable."""
        return self._split(self.key(memory)), self._split(self.value(memory))

    def heads_major(self, x: jax.Array) -> jax.Array:
        """[B, T, H, D] -> [B, H, T, D]: the layout of caches and cached memory K/V."""
        return constrain(x.transpose(0, 2, 1, 3), ("batch", "heads", "length", "kv"))

    def project_kv_heads_major(self, memory: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, Tk, kv_features] -> (k, v) each [B, H, Tk, D], for reuse over many queries."""
        k, v = self.project_kv(memory)
        return self.heads_major(k), self.heads_major(v)

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array,
               mask: jax.Array | None = None, kv_heads_major: bool = False) -> jax.Array:
        out = dot_product_attention(q, k, v, mask, kv_heads_major=kv_heads_major)
        b, t = out.shape[:2]
        return self.out(out.reshape(b, t, self.num_heads * self.head_dim))  # [B, Tq, out]

    def __call__(self, x: jax.Array, memory: jax.Array | None = None,
                 mask: jax.Array | None = None) -> jax.Array:
        k, v = self.project_kv(x if memory is None else memory)
        return self.attend(self.project_query(x), k, v, mask)


@jax.custom_vjp
def materialize_grad(x: jax.Array) -> jax.Array:
    """Identity whose backward pass writes the incoming gradient to memory once.

    Called on the residual stream at every block's entry. XLA:CPU fuses cheap elementwise
    producers into each of their consumers, so the residual-stream gradient (a sum over
    all later blocks) was recomputed inside every consumer fusion of every block: work
    quadratic in depth, 13% of a small ViT + GPT-2 train step on CPU
    (benchmarks/train_step.py). XLA:CPU drops optimization barriers, so on CPU the gradient
    passes through a conditional (its operand must be a buffer) whose predicate is always
    true; other platforms keep the plain identity.
    """
    return x


def _keep_in_memory(g: jax.Array) -> jax.Array:
    first = g.reshape(-1)[:1]
    always = ((first == first) | (first != first))[0]  # true for every value, NaN included
    return jax.lax.cond(always, lambda y: y, jnp.zeros_like, g)


def _materialize_fwd(x: jax.Array) -> tuple[jax.Array, None]:
    return x, None


def _materialize_bwd(_, g: jax.Array) -> tuple[jax.Array]:
    return (jax.lax.platform_dependent(g, cpu=_keep_in_memory, default=lambda y: y),)


materialize_grad.defvjp(_materialize_fwd, _materialize_bwd)


def causal_mask(t: int) -> jax.Array:
    """[1, 1, T, T] bool, True on and below the diagonal."""
    return jnp.tril(jnp.ones((t, t), bool))[None, None]


def padding_mask(mask: jax.Array) -> jax.Array:
    """[B, Tk] (1 = token) -> [B, 1, 1, Tk] bool for keys."""
    return mask.astype(bool)[:, None, None, :]
