"""Building blocks shared by every tower: linear, embedding, layer norm, MLP, attention.

Every parameter is an ``nnx.Param`` carrying ``logical_axes`` metadata (see
``ravlm_jax.sharding``). Kernels are stored ``[in, out]`` (the Flax convention; Hugging Face
``nn.Linear`` weights are transposed by the loaders, GPT-2 ``Conv1D`` ones are not).
Parameters are float32; ``dtype`` is the compute dtype (bfloat16 on TPU). Layer norms and
softmax always run in float32; matmuls in a low-precision ``dtype`` accumulate in float32
(:func:`einsum`).
"""

from __future__ import annotations

import functools
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


def einsum(equation: str, x: jax.Array, w: jax.Array, dtype: DType,
           bias: jax.Array | None = None, out_dtype: DType | None = None) -> jax.Array:
    """``jnp.einsum(equation, x, w) + bias`` computed in ``dtype``, returned in
    ``out_dtype`` (default ``dtype``).

    Below float32 the product accumulates in float32, the bias is added in float32 and the
    sum is rounded once; the two gradient products take the cotangent rounded to ``dtype``
    (as autocast does) and accumulate in float32 too. This is also what makes bfloat16 fast
    on CPUs with bf16 dot instructions: XLA:CPU runs a bf16 x bf16 -> f32 dot on them (about
    2x float32 here), while a bf16-output dot and a mixed f32 x bf16 one are computed in
    float32 and converted (slower than float32 alone), and a bf16 bias gradient is reduced
    through a slow windowed path. Batched products (an index in x, w and the output) are
    computed in float32 from the rounded operands: through this custom gradient, a batched
    bf16 -> f32 dot failed at run time on XLA:CPU ("Unsupported element type for
    DotThunk::Execute: BF16 x BF16 = F32").
    Two operands, each index in at least two of x, w and the output.
    """
    y = _einsum_to_f32(equation, x, w, dtype)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(dtype if out_dtype is None else out_dtype)


def _einsum_to_f32(equation: str, x: jax.Array, w: jax.Array, dtype: DType) -> jax.Array:
    """:func:`einsum` before its bias and rounding: operands in ``dtype``, float32 result."""
    if jnp.dtype(dtype) == jnp.float32:
        return jnp.einsum(equation, x.astype(dtype), w.astype(dtype))
    operands, out = equation.split("->")
    xs, ws = operands.split(",")
    if set(xs) & set(ws) & set(out) - {"."}:  # batched (see above)
        return jnp.einsum(equation, x.astype(dtype).astype(jnp.float32),
                          w.astype(dtype).astype(jnp.float32))
    return _einsum_f32_accumulate(equation, jnp.dtype(dtype), x.dtype, w.dtype, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _einsum_f32_accumulate(equation: str, dtype: jnp.dtype, x_dtype: jnp.dtype,
                           w_dtype: jnp.dtype, x: jax.Array, w: jax.Array) -> jax.Array:
    """Operands rounded to ``dtype`` inside, float32 result. The gradients come back in the
    operands' own dtypes (``x_dtype``, ``w_dtype``), unrounded: a float32 kernel's gradient
    is not rounded to bf16."""
    return jnp.einsum(equation, x.astype(dtype), w.astype(dtype),
                      preferred_element_type=jnp.float32)


def _einsum_f32_accumulate_fwd(equation, dtype, x_dtype, w_dtype, x, w):
    xd, wd = x.astype(dtype), w.astype(dtype)  # saved rounded: half the residual memory
    return jnp.einsum(equation, xd, wd, preferred_element_type=jnp.float32), (xd, wd)


def _einsum_f32_accumulate_bwd(equation, dtype, x_dtype, w_dtype, residuals, g):
    x, w = residuals
    operands, out = equation.split("->")
    xs, ws = operands.split(",")
    g = g.astype(dtype)
    dx = jnp.einsum(f"{out},{ws}->{xs}", g, w, preferred_element_type=jnp.float32)
    dw = _weight_grad(xs, ws, out, x, g)
    return dx.astype(x_dtype), dw.astype(w_dtype)


def _weight_grad(xs: str, ws: str, out: str, x: jax.Array, g: jax.Array) -> jax.Array:
    """``einsum(f"{xs},{out}->{ws}", x, g)`` in float32. When x and the output share their
    leading indices and w is [in, out] or [out, in] (Linear, the tied head), this is
    ``a^T b`` over the flattened rows, taken by :func:`_rows_contracted`."""
    i, o = xs[-1:], out[-1:]
    if xs[:-1] == out[:-1] and i != o and ws in (i + o, o + i):
        x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])  # [N, I], [N, O]
        return _rows_contracted(x2, g2) if ws == i + o else _rows_contracted(g2, x2)
    return jnp.einsum(f"{xs},{out}->{ws}", x, g, preferred_element_type=jnp.float32)


def _rows_contracted(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [N, P], b [N, Q] -> a^T b [P, Q] float32 (a weight gradient)."""
    return jax.lax.platform_dependent(a, b, cpu=_rows_contracted_cpu,
                                      default=_rows_contracted_plain)


def _rows_contracted_plain(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum("np,nq->pq", a, b, preferred_element_type=jnp.float32)  # [P, Q]


def _rows_contracted_cpu(a: jax.Array, b: jax.Array) -> jax.Array:
    """XLA:CPU's bf16 dot reads a left operand contracted over its rows at under half its
    speed (bf16 [1040, 256]^T [1040, 1024]: 177 vs 338 GFLOP/s here), and folds a plain
    transpose back into the dot; a transpose padded by 8 rows is a real copy (a few %
    of the dot). The narrower operand is the one copied."""
    if a.shape[1] > b.shape[1]:
        return _rows_contracted_cpu(b, a).T  # [P, Q]
    p = a.shape[1]
    a_t = jnp.pad(a.T, ((0, 8), (0, 0)))  # [P + 8, N]
    return jnp.dot(a_t, b, preferred_element_type=jnp.float32)[:p]  # [P, Q]


_einsum_f32_accumulate.defvjp(_einsum_f32_accumulate_fwd, _einsum_f32_accumulate_bwd)


normal = jax.nn.initializers.normal
zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones


class Linear(nnx.Module):
    """``y = x @ kernel + bias`` with kernel ``[in, out]``, computed in ``dtype`` and
    returned in ``out_dtype`` (default ``dtype``; float32 for an LM head, whose logits a
    float32 softmax reads: no rounding to bf16 and back)."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs,
                 axes: Axes = (None, None), use_bias: bool = True, init_std: float = 0.02,
                 dtype: DType = jnp.float32, out_dtype: DType | None = None):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.out_dtype = dtype if out_dtype is None else out_dtype
        self.kernel = param(rngs, normal(init_std), (in_features, out_features), axes)
        self.bias = param(rngs, zeros, (out_features,), axes[-1:]) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        return einsum("...i,io->...o", x, self.kernel[...], self.dtype, bias,
                      out_dtype=self.out_dtype)  # [..., in] -> [..., out]

    def transposed(self, x: jax.Array) -> jax.Array:
        """``self(x).T`` for rows ``x [N, in]`` -> ``[out, N]``, computed in that layout
        (an output-major head; see :meth:`Decoder.vocab_major_logits`)."""
        bias = None if self.bias is None else self.bias[...][:, None]  # [out, 1]
        return einsum("ni,io->on", x, self.kernel[...], self.dtype, bias,
                      out_dtype=self.out_dtype)


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
        """The tied output head: float32 logits (computed in ``dtype``)."""
        return einsum("...d,vd->...v", x, self.embedding[...], self.dtype,
                      out_dtype=jnp.float32)  # [..., num]

    def attend_transposed(self, x: jax.Array) -> jax.Array:
        """``attend(x).T`` for rows ``x [N, features]`` -> ``[num, N]`` float32, computed
        in that layout (see :meth:`Decoder.vocab_major_logits`)."""
        return einsum("nd,vd->vn", x, self.embedding[...], self.dtype, out_dtype=jnp.float32)


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
    """Softmax attention in float32 (bf16 products here gave no measurable gain on the CPU
    train step, docs/PERFORMANCE.md).

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
