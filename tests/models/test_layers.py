"""layers.einsum: the low-precision matmul with float32 accumulation and its custom
gradient, checked against float32 autodiff of a plain einsum for every equation shape the
models use."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ravlm_jax.models.layers import Linear, einsum

# (equation, x shape, w shape): Linear, the tied head, the neighbour tables, the copy head's
# scores and the ViT patch embedding.
CASES = [
    ("...i,io->...o", (2, 3, 16), (16, 8)),
    ("...i,io->...o", (2, 3, 8), (8, 16)),  # the weight gradient copies the other operand
    ("...d,vd->...v", (2, 3, 16), (40, 16)),
    ("w,wi->i", (16,), (16, 8)),
    ("bthd,bhmd->bhtm", (2, 3, 4, 8), (2, 4, 5, 8)),
    ("bhpwqc,pqcd->bhwd", (2, 2, 4, 2, 4, 3), (4, 4, 3, 8)),
]


def _reference(equation, x, w, g, dtype):
    """Forward and both cotangents: float32 autodiff of a plain einsum on the operands (and
    cotangent) rounded to ``dtype``, at the highest matmul precision."""
    rnd = lambda a: jnp.asarray(jnp.asarray(a, dtype), jnp.float32)
    y, vjp = jax.vjp(lambda a, b: jnp.einsum(equation, a, b,
                                             precision=jax.lax.Precision.HIGHEST),
                     rnd(x), rnd(w))
    return (y, *vjp(rnd(g)))


@pytest.mark.parametrize("equation,x_shape,w_shape", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_einsum_and_its_gradients_match_float32_autodiff(equation, x_shape, w_shape, dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    y, vjp = jax.vjp(lambda a, b: einsum(equation, a, b, dtype), x, w)
    g = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw = vjp(jnp.asarray(g, y.dtype))
    want_y, want_dx, want_dw = _reference(equation, x, w, g, dtype)
    assert y.dtype == dtype and dx.dtype == jnp.float32 and dw.dtype == jnp.float32
    # bf16 rounds each input (rel. 2^-9) and the result once; the sums stay float32.
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    for got, want in ((y, want_y), (dx, want_dx), (dw, want_dw)):
        want = np.asarray(want, np.float64)
        scale = np.abs(want).max()
        np.testing.assert_allclose(np.asarray(got, np.float64) / scale, want / scale,
                                   atol=tol)


def test_bfloat16_accumulates_in_float32():
    """A long sum of equal small terms: bf16 accumulation would stall at 256 * 2^-8."""
    x = jnp.full((1, 4096), 2.0 ** -8)
    w = jnp.ones((4096, 1))
    assert float(einsum("bi,io->bo", x, w, jnp.bfloat16)[0, 0]) == 16.0


def test_bfloat16_linear_gradient_is_taken_in_bfloat16_and_returned_in_float32():
    from flax import nnx

    lin = Linear(16, 8, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 16)), jnp.float32)
    grads = nnx.grad(lambda m: m(x).astype(jnp.float32).sum())(lin)
    assert grads.kernel[...].dtype == jnp.float32
    want = np.broadcast_to(np.asarray(x, np.float64).sum(0)[:, None], (16, 8))
    np.testing.assert_allclose(np.asarray(grads.kernel[...]), want, rtol=1e-2, atol=1e-2)
    jaxpr = str(jax.make_jaxpr(jax.grad(
        lambda k: einsum("bi,io->bo", x, k, jnp.bfloat16).astype(jnp.float32).sum()))(
        lin.kernel[...]))
    # every dot takes bf16 operands and returns float32 (the fast XLA:CPU path)
    # forward, input gradient, and the weight gradient (CPU and default branches)
    assert jaxpr.count("dot_general[") >= 3
    assert jaxpr.count("preferred_element_type=float32") == jaxpr.count("dot_general[")


def test_weight_gradient_cpu_layout_equals_the_plain_product():
    """The CPU branch (a padded transposed copy of the narrower operand) and the default
    branch (one einsum) compute the same a^T b, both operand orders."""
    from ravlm_jax.models.layers import _rows_contracted_cpu, _rows_contracted_plain

    rng = np.random.default_rng(2)
    for p, q in ((16, 40), (40, 16)):
        a = jnp.asarray(rng.standard_normal((24, p)), jnp.bfloat16)
        b = jnp.asarray(rng.standard_normal((24, q)), jnp.bfloat16)
        want = np.asarray(a, np.float64).T @ np.asarray(b, np.float64)
        for fn in (_rows_contracted_cpu, _rows_contracted_plain):
            got = jax.jit(fn)(a, b)
            assert got.shape == (p, q) and got.dtype == jnp.float32
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)
