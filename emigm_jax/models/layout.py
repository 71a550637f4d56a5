"""Parameter layouts of the block stacks: unrolled (``block_{i}``) and scanned (``block``).

``model.scan_layers=True`` stores a stack's ``depth`` blocks as one module ``block`` whose
leaves carry a leading layer axis; unrolled, they are ``block_0 .. block_{depth-1}``. The two
hold the same numbers, so a checkpoint (parameters, EMA, optimizer moments) written in one
layout is converted to the other here before it is restored or compared.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = "block"
_INDEXED = re.compile(rf"{BLOCK}_(\d+)")


def _map_dicts(tree: Any, fn) -> Any:
    """Applies ``fn`` bottom-up to every mapping in a pytree (mappings, tuples, registered
    nodes such as a train-state dataclass; leaves are left as they are)."""
    if isinstance(tree, Mapping):
        return fn({k: _map_dicts(v, fn) for k, v in tree.items()})
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # optax states are namedtuples
        return type(tree)(*(_map_dicts(v, fn) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_map_dicts(v, fn) for v in tree)
    # Any other registered pytree node: rebuild it from its converted direct children.
    children, node = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is not tree)
    if jax.tree_util.treedef_is_leaf(node):
        return tree
    return node.unflatten([_map_dicts(c, fn) for c in children])


def _stack_one(d: dict) -> dict:
    idx = [_INDEXED.fullmatch(k) for k in d]
    if not d or not all(idx) or sorted(int(m.group(1)) for m in idx) != list(range(len(d))):
        return d
    blocks = [d[f"{BLOCK}_{i}"] for i in range(len(d))]
    stack = np.stack if isinstance(jax.tree.leaves(blocks[0])[0], np.ndarray) else jnp.stack
    return {BLOCK: jax.tree.map(lambda *xs: stack(xs), *blocks)}


def _unstack_one(d: dict) -> dict:
    if set(d) != {BLOCK}:
        return d
    depth = int(jax.tree.leaves(d[BLOCK])[0].shape[0])
    return {f"{BLOCK}_{i}": jax.tree.map(lambda x, i=i: x[i], d[BLOCK]) for i in range(depth)}


def stack_layers(tree: Any) -> Any:
    """Unrolled -> scanned: every ``{block_0..block_{n-1}}`` mapping becomes ``{block: [n, ...]}``."""
    return _map_dicts(tree, _stack_one)


def unstack_layers(tree: Any) -> Any:
    """Scanned -> unrolled: every ``{block: [n, ...]}`` mapping becomes ``block_0..block_{n-1}``."""
    return _map_dicts(tree, _unstack_one)


def is_scanned(tree: Any) -> bool:
    """Whether any block stack in ``tree`` is in the scanned layout."""
    found = []
    _map_dicts(tree, lambda d: found.append(set(d) == {BLOCK}) or d)
    return any(found)


def layer_ndim(path_names: Sequence[str], leaf: Any) -> int:
    """A parameter's rank within one layer: leaves of a scanned stack carry the layer axis."""
    return leaf.ndim - (1 if BLOCK in path_names else 0)


def to_layout(tree: Any, scan_layers: bool) -> Any:
    """``tree`` (params, EMA or optimizer state, either layout) in the requested layout."""
    return stack_layers(unstack_layers(tree)) if scan_layers else unstack_layers(tree)
