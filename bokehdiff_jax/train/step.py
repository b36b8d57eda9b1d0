"""One pure, donated train step ``(state, frozen, batch, key) -> (state, metrics)`` and its ahead-of-time
compilation with shardings from the mesh.

- ``key`` is the run's key; the step draws ``fold_in(key, state.step)`` (then one key per micro-batch),
  so the randomness of step ``n`` is a function of ``(seed, n)`` alone and a resumed run repeats it.
- Gradients are taken with respect to ``state.params`` only; ``frozen`` is an argument, never
  differentiated, copied or returned.
- Gradient accumulation splits the batch into ``accum`` interleaved micro-batches (rows ``i::accum``,
  so each device's rows stay on that device) and scans over them; one optimiser update per step.
- A non-finite loss or gradient norm leaves the state unchanged (``metrics["finite"]`` is False): the
  loop stops there with an error, and no checkpoint is ever made from a non-finite state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# loss_fn(params, carry, frozen, batch, key, step) -> (objective, (terms, new carry)); see train.objective.
LossFn = Callable[..., tuple[jax.Array, tuple[dict[str, jax.Array], Any]]]


@flax.struct.dataclass
class TrainState:
    """What a step changes: ``step`` (int32 scalar: updates done), the trained ``params`` (fp32), the
    optimiser state, and ``carry``: state that steps update without gradients (the discriminator's
    spectral-norm vectors)."""

    step: jax.Array
    params: Any
    opt_state: Any
    carry: Any


def init_state(params: Any, tx: optax.GradientTransformation, carry: Any = None) -> TrainState:
    """The state before step 0."""
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), carry=carry if carry else {}
    )


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    accum: int = 1,
    lr_fn: Callable[[jax.Array], jax.Array] | None = None,
) -> Callable[[TrainState, Any, dict, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure update. ``lr_fn(step)`` (optional) is reported as ``metrics["lr"]``.

    Metrics (fp32 scalars): ``objective`` (the differentiated value), the loss function's terms
    (``loss`` among them), ``grad_norm`` (global, all groups), ``lr`` and ``finite`` (bool).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, frozen: Any, batch: dict, key: jax.Array):
        step_key = jax.random.fold_in(key, state.step)
        if accum == 1:
            (obj, (terms, carry)), grads = grad_fn(
                state.params, state.carry, frozen, batch, step_key, state.step
            )
        else:

            def split(x):  # [B, ...] -> [accum, B / accum, ...], micro-batch i = rows i::accum
                return jnp.moveaxis(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 1, 0)

            micro = jax.tree_util.tree_map(split, batch)

            def body(acc, xs):
                mb, i = xs
                total, carry = acc
                (o, (t, carry)), g = grad_fn(
                    state.params, carry, frozen, mb, jax.random.fold_in(step_key, i), state.step
                )
                return (jax.tree_util.tree_map(jnp.add, total, (o, t, g)), carry), None

            first = jax.tree_util.tree_map(lambda x: x[0], micro)
            shapes = jax.eval_shape(grad_fn, state.params, state.carry, frozen, first, step_key, state.step)
            (o_s, (t_s, _)), g_s = shapes
            zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), (o_s, t_s, g_s))
            (total, carry), _ = jax.lax.scan(body, (zeros, state.carry), (micro, jnp.arange(accum)))
            obj, terms, grads = jax.tree_util.tree_map(lambda x: x / accum, total)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        # Finite loss, gradient and update: then the new params are finite too (the loop checks this
        # flag before every checkpoint, so no checkpoint is made from a non-finite state).
        finite = jnp.isfinite(obj) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
        new = TrainState(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            carry=carry,
        )
        metrics = {"objective": obj, **terms, "grad_norm": grad_norm, "finite": finite}
        metrics["lr"] = jnp.asarray(lr_fn(state.step) if lr_fn is not None else 0.0, jnp.float32)
        return new, metrics

    return train_step


def abstract(tree: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct``s with shardings, from a tree of arrays or structs and a sharding tree."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def compile_step(
    train_step: Callable,
    *,
    state: Any,
    frozen: Any,
    batch: Any,
    key: Any,
    state_shardings: Any,
    frozen_shardings: Any,
    batch_shardings: Any,
    mesh: jax.sharding.Mesh,
    compiler_options: dict[str, Any] | None = None,
) -> jax.stages.Compiled:
    """``jit(train_step)`` with in/out shardings and the state donated, lowered from abstract shapes
    (``state``, ``frozen``, ``batch``, ``key`` may be arrays or ``ShapeDtypeStruct``s) and compiled
    (``compiler_options``: XLA options for this compilation only)."""
    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(
        train_step,
        in_shardings=(state_shardings, frozen_shardings, batch_shardings, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
    args = (
        abstract(state, state_shardings),
        abstract(frozen, frozen_shardings),
        abstract(batch, batch_shardings),
        jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated),
    )
    with jax.set_mesh(mesh):
        lowered = jitted.lower(*args)
    return lowered.compile(compiler_options=compiler_options) if compiler_options else lowered.compile()
