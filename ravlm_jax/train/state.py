"""Train state: trainable parameters, optimizer state and step, created sharded.

A model is split into ``graphdef`` (static), ``params`` (the trainable ``nnx.Param``s),
``frozen`` (every other parameter: pretrained towers the config freezes) and ``rest``
(non-parameter variables). Only ``TrainState = (step, params, opt_state)`` changes during
training and goes into checkpoints; frozen towers are rebuilt from their pretrained source
on resume and saved once with the exported model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ravlm_jax.checkpoints.io import path_key
from ravlm_jax.sharding import state_shardings


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array            # [] int32
    params: Any                # nnx.State of trainable parameters
    opt_state: Any             # optax state


def frozen_filter(patterns: Sequence[str]) -> Callable[[tuple, Any], bool]:
    """An nnx filter: True for parameters whose dotted path matches one of the regexes
    (``re.match`` on e.g. ``encoder.image_tower.blocks.3.conv.kernel``)."""
    compiled = [re.compile(p) for p in patterns]

    def is_frozen(path: tuple, value: Any) -> bool:
        key = path_key(path)
        return isinstance(value, nnx.Param) and any(c.match(key) for c in compiled)

    return is_frozen


def split_model(model: nnx.Module, frozen_patterns: Sequence[str] = ()):
    """-> (graphdef, trainable params, frozen params, rest)."""
    is_frozen = frozen_filter(frozen_patterns)
    trainable = nnx.All(nnx.Param, nnx.Not(is_frozen))
    return nnx.split(model, trainable, is_frozen, ...)


def count(tree: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def make_optimizer(cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation,
                                                         optax.Schedule]:
    """AdamW with linear warmup + cosine decay and global-norm clipping.
    No weight decay on biases, norms, embeddings' scalars (rank < 2)."""
    warmup = min(int(cfg.warmup_steps), max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=float(cfg.learning_rate), warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=float(cfg.learning_rate) *
        float(cfg.get("final_lr_fraction", 0.0)))
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
    tx = optax.chain(
        optax.clip_by_global_norm(float(cfg.grad_clip)),
        optax.adamw(schedule, b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.999)),
                    weight_decay=float(cfg.weight_decay), mask=decay_mask),
    )
    return tx, schedule


def create_train_state(params: Any, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
                       ) -> tuple[TrainState, Any]:
    """Optimizer state created by a jitted init whose outputs land with the same shardings
    as the parameters they belong to. Returns (state, state shardings)."""
    param_shardings = state_shardings(params, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, params)
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                          transform_non_params=lambda _: replicated)
    shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)

    def init(params):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params))

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)(params)
    return state, shardings
