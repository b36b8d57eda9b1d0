"""``pisa_attention``: the one public entry point of PISA (issue 3 section 1; SPEC section 2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.pisa.blockwise import blockwise_attention
from bokehdiff_jax.pisa.config import DEFAULT_CONFIG, PisaConfig, resolve_impl
from bokehdiff_jax.pisa.dense import dense_attention, dense_weights
from bokehdiff_jax.pisa.geometry import CallArrays, Static, Tokens, prepare


def check_inputs(q, k, v, grid, disparity, focus, strength) -> None:
    """Raises ``InputError`` (one line: what was wrong, what was expected) on inconsistent shapes."""
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise InputError(
            f"PISA q, k, v shapes {q.shape}, {k.shape}, {v.shape}: expected three equal "
            "[batch, tokens, heads, head_dim] (self-attention)"
        )
    h, w = grid
    if h < 1 or w < 1 or h * w != q.shape[1]:
        raise InputError(f"PISA grid {tuple(grid)} has {h * w} tokens but q has {q.shape[1]}")
    b = q.shape[0]
    if jnp.ndim(disparity) != 3 or disparity.shape[0] != b:
        raise InputError(f"PISA disparity shape {jnp.shape(disparity)}: expected [batch={b}, H, W]")
    for name, x in (("focus", focus), ("strength", strength)):
        if jnp.shape(x) != (b,):
            raise InputError(f"PISA {name} shape {jnp.shape(x)}: expected [batch={b}]")


def run_impl(st: Static, arrays: CallArrays, tq: Tokens, tk: Tokens, q, k, v, seq_axis: str | None = None):
    """Dispatches to the configured implementation (queries ``tq`` against keys ``tk``); ``"auto"`` is
    resolved here, from this call's (per-device) shapes and the backend (``config.resolve_impl``)."""
    impl, keys_per_step = resolve_impl(
        st.config,
        batch=q.shape[0],
        heads=q.shape[2],
        n_q=q.shape[1],
        n_k=k.shape[1],
        train=st.train,
        backend=jax.default_backend(),
    )
    if impl == "dense":
        return dense_attention(st, arrays, tq, tk, q, k, v, seq_axis)
    return blockwise_attention(
        st, arrays, tq, tk, q, k, v, seq_axis, sparse=impl == "sparse", keys_per_step=keys_per_step
    )


def pisa_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    *,
    grid: tuple[int, int],
    disparity: jnp.ndarray,
    focus: jnp.ndarray,
    strength: jnp.ndarray,
    config: PisaConfig = DEFAULT_CONFIG,
    step=None,
    key=None,
    train: bool = False,
) -> jnp.ndarray:
    """Physics-inspired self-attention (paper Sec. 3.2, SPEC section 2).

    Args:
      q, k, v: ``[batch, tokens, heads, head_dim]``, ``tokens = h * w`` in row-major order.
      grid: ``(h, w)``, the token grid (static).
      disparity: ``[batch, H, W]`` in [0, 1] (1 nearest) at input-image resolution.
      focus: ``[batch]`` focus disparity ``d_f``.
      strength: ``[batch]`` ``K``: CoC radius in input-image pixels per unit disparity.
      config: switches and sizes (static; hashable).
      step: training step for the hardness schedule ``log(3 + step)``; ``None`` = inference hardness.
      key: ``jax.random`` key for the training jitter of the occlusion samples and for dropout; needed
        only when ``train`` and one of them is on (inference uses fixed stratified offsets).
      train: training mode (jitter from ``key``, dropout, optional occlusion clamp).

    Returns ``[batch, tokens, heads, head_dim]`` in ``q.dtype``. With every switch off this is
    ``jax.nn.dot_product_attention(q, k, v)``.
    """
    check_inputs(q, k, v, grid, disparity, focus, strength)
    st, arrays, tokens = prepare(
        config, tuple(grid), q.shape[2], disparity, focus, strength, step, key, train
    )
    return run_impl(st, arrays, tokens, tokens, q, k, v)


def pisa_weights(
    q: jnp.ndarray,
    k: jnp.ndarray,
    *,
    grid: tuple[int, int],
    disparity: jnp.ndarray,
    focus: jnp.ndarray,
    strength: jnp.ndarray,
    config: PisaConfig = DEFAULT_CONFIG,
) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """The dense inference weights ``W [batch, heads, N, N]`` (``o_i = sum_j W_ij v_j``) and the
    visibility ``Vis [batch, 1, N, N]`` (``None`` without occlusion), for inspection and plots.
    Materialises N x N: small grids only."""
    check_inputs(q, k, k, grid, disparity, focus, strength)
    st, arrays, tokens = prepare(
        config, tuple(grid), q.shape[2], disparity, focus, strength, None, None, False
    )
    return dense_weights(st, arrays, tokens, tokens, q, k)
