"""One mesh, one table of logical-axis rules, and the helpers that apply them.

Parameters and activations name their dimensions with *logical* axes (``embed``, ``mlp``,
``heads`` ...). :data:`DEFAULT_RULES` maps those names to the *mesh* axes ``data``,
``fsdp`` and ``model``. Changing the parallelism of a run is therefore a config change (the
mesh shape, or the rules), never a model change. The same code runs on 1 CPU, 8 fake CPU
devices in tests, a GPU, or a TPU pod slice.

The mesh uses ``AxisType.Auto`` on purpose: models annotate parameters and a few key
activations, and XLA's sharding propagation fills in the rest. ``Explicit`` axes would make
every op's output sharding part of its type, which the towers loaded from Hugging Face layouts
do not need.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "model")

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("vocab", "model"),
    ("patch", None),
    ("channels", None),
    ("conv", None),
    ("datastore", ("data", "fsdp", "model")),
    ("neighbours", None),
    ("norm", None),
)

LOGICAL_AXES_KEY = "logical_axes"  # metadata key on nnx.Variable


def make_mesh(shape: Sequence[int] | dict[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, model) mesh. ``None`` puts every device on ``data``; a -1 entry takes
    whatever devices are left, as in big_vision/MaxText configs."""
    devices = list(devices if devices is not None else jax.devices())
    if shape is None:
        shape = (len(devices), 1, 1)
    if isinstance(shape, dict):
        shape = tuple(shape.get(a, 1) for a in MESH_AXES)
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one -1")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, "
                         f"{len(devices)} available")
    dev = np.asarray(devices).reshape(shape)
    return Mesh(dev, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _rule_table(rules: Rules | None) -> dict[str, Any]:
    return dict(DEFAULT_RULES if rules is None else rules)


def logical_to_spec(axes: Sequence[str | None] | None, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules: Rules | None = None) -> P:
    """Logical axis names -> PartitionSpec.

    With ``shape`` and ``mesh`` given, mesh axes that do not divide a dimension are dropped
    (vocab 30522 on model=4 stays replicated rather than failing), and a mesh axis is used
    at most once per array.
    """
    if axes is None:
        return P()
    table = _rule_table(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        target = table.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        targets = (target,) if isinstance(target, str) else tuple(target)
        kept = []
        size = 1
        for t in targets:
            if t in used:
                continue
            if mesh is not None:
                n = mesh.shape[t]
                if shape is not None and shape[i] % (size * n) != 0:
                    continue
                size *= n
            kept.append(t)
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def logical_axes_of(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    return variable.get_metadata().get(LOGICAL_AXES_KEY)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_specs(state: Any, mesh: Mesh | None = None, rules: Rules | None = None) -> Any:
    """PartitionSpecs for an nnx State (or any pytree of Variables/arrays). Each Variable
    keeps its place and holds its spec, so the result has the state's exact tree structure
    (usable with jax.tree.map alongside the state, optax state and jit shardings)."""

    def spec(x):
        if _is_variable(x):
            return x.replace(logical_to_spec(logical_axes_of(x), x.get_value().shape, mesh,
                                             rules))
        return P()

    return jax.tree.map(spec, state, is_leaf=_is_variable)


def state_shardings(state: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """NamedShardings with the state's exact tree structure (see :func:`state_specs`)."""
    to_named = lambda s: NamedSharding(mesh, s.get_value() if _is_variable(s) else s)
    return jax.tree.map(
        lambda s: s.replace(to_named(s)) if _is_variable(s) else to_named(s),
        state_specs(state, mesh, rules), is_leaf=lambda x: _is_variable(x) or isinstance(x, P))


def named_specs(module_or_state: Any, mesh: Mesh | None = None,
                rules: Rules | None = None) -> dict[str, str]:
    """Flat ``{'path/to/param': 'PartitionSpec(...)'}``: the golden-snapshot format."""
    state = (nnx.state(module_or_state) if isinstance(module_or_state, nnx.Module)
             else module_or_state)
    flat = nnx.to_flat_state(state)
    out = {}
    for path, var in flat:
        key = "/".join(str(p) for p in path)
        axes = logical_axes_of(var) if isinstance(var, nnx.Variable) else None
        shape = var.get_value().shape
        out[key] = f"{tuple(shape)} {axes} -> {logical_to_spec(axes, shape, mesh, rules)}"
    return out


def current_mesh() -> Mesh | None:
    """The mesh set by ``jax.set_mesh`` (concrete or abstract), or None outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    return mesh


def constrain(x: jax.Array, axes: Sequence[str | None], rules: Rules | None = None) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op outside a mesh context, so
    models run unchanged on one device."""
    mesh = current_mesh()
    if mesh is None:
        return x
    spec = logical_to_spec(axes, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, spec)


def create_sharded(factory: Callable[[], nnx.Module], mesh: Mesh,
                   rules: Rules | None = None) -> nnx.Module:
    """Build a module directly in its sharded layout: eval_shape for the abstract state,
    shardings from its logical axes, then one jitted init whose outputs land sharded.
    No unsharded copy of the parameters ever exists on the host or on one device."""
    abstract = nnx.eval_shape(factory)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    def init():
        return nnx.state(factory())

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def shard_module(module: nnx.Module, mesh: Mesh, rules: Rules | None = None) -> nnx.Module:
    """Place an existing module's parameters (e.g. loaded from a checkpoint) on the mesh."""
    graphdef, state = nnx.split(module)
    shardings = state_shardings(state, mesh, rules)
    state = jax.device_put(state, shardings)
    return nnx.merge(graphdef, state)


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules | None = None) -> NamedSharding:
    """Sharding for an input array whose leading axis is the batch."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), None,
                                               None, rules))


def count_params(module: nnx.Module, filt: Any = nnx.Param) -> int:
    state = nnx.state(module, filt)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
