"""LoRA: low-rank adapters on chosen linear weights, a frozen base, and merging for export.

Adapters are parameters of the model itself (`<name>_lora_a`, `<name>_lora_b` beside the
weight `<name>`), created when the weight's path matches a target pattern, so they are
sharded, checkpointed and scanned over layers like any other parameter. For a weight used
as `einsum(eq, x, w)`, A spans the contracted dims of w and B the kept ones:
    y = x·W + (alpha / rank) · (dropout(x)·A)·B
with B initialised to zero, so a fresh adapter leaves the model unchanged.
"""
from __future__ import annotations

import dataclasses
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np

LORA_A, LORA_B = "_lora_a", "_lora_b"

# every linear weight of the vision tower, mergers and decoder; not embeddings, the
# Conv3d patch embedding, the position table or the LM head
DEFAULT_TARGETS = (
    r"^layers/(q|k|v|o|gate|up|down)$",
    r"^visual/blocks/(q|k|v|o|fc1|fc2)$",
    r"^visual/(merger|deepstack)/(fc1|fc2)$",
)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 64
    alpha: float = 128.0
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def matches(self, path: str) -> bool:
        return any(re.search(t, path) for t in self.targets)


def _split_eq(eq: str):
    ins, out = eq.split("->")
    x_spec, w_spec = ins.split(",")
    free = next(c for c in "zyxwZYXW" if c not in eq)
    contracted = [c for c in w_spec if c not in out]
    kept = [c for c in w_spec if c in out]
    mid = "".join(c for c in x_spec if c not in contracted) + free
    a_spec = "".join(contracted) + free
    b_spec = free + "".join(kept)
    return f"{x_spec},{a_spec}->{mid}", f"{mid},{b_spec}->{out}", contracted, kept, w_spec


def adapter_shapes(eq: str, w_shape, w_names, rank: int):
    """Shapes and logical names of A and B for a weight used as einsum(eq, x, w)."""
    _, _, contracted, kept, w_spec = _split_eq(eq)
    dims = dict(zip(w_spec, w_shape))
    names = dict(zip(w_spec, w_names))
    a = (tuple(dims[c] for c in contracted) + (rank,), tuple(names[c] for c in contracted) + ("lora",))
    b = ((rank,) + tuple(dims[c] for c in kept), ("lora",) + tuple(names[c] for c in kept))
    return a, b


def contract(eq: str, x, w):
    """einsum(eq, x, w) as one 2-D matmul [rows, K] x [K, ...] where the layout allows.

    When x's free dims lead (in the output's order) and the contracted dims trail x and lead
    w (same order), e.g. `btd,df->btf` or `btnh,nhd->btd`, both are merged by free reshapes.
    Why: XLA:CPU otherwise (a) copied a transposed weight at every call when two dims were
    contracted (the attention output projection, each layer of each decode step) and (b) in
    the backward pass built the weight gradient's [F, B*T] operand with an untiled 3-D
    transpose (~8 ms per MLP layer on the 80M benchmark config) instead of its tiled 2-D one.
    """
    (x_spec, w_spec), out = eq.split("->")[0].split(","), eq.split("->")[1]
    shared = "".join(c for c in w_spec if c in x_spec and c not in out)
    lead = x_spec[: len(x_spec) - len(shared)]
    n = len(shared)
    # out == lead + w's kept dims: each dim of x is a row or contracted, each of w contracted or
    # a column (a batch dim shared by x and w cannot pass: it would stand twice in out)
    if not (x_spec.endswith(shared) and w_spec.startswith(shared) and out == lead + w_spec[n:]) \
            or (n < 2 and len(lead) < 2):
        return jnp.einsum(eq, x, w)
    k = int(np.prod(w.shape[:n]))
    y = jnp.dot(x.reshape(-1, k), w.reshape((k, -1)))
    return y.reshape(x.shape[: len(lead)] + w.shape[n:])


def lora_einsum(eq: str, x, w, a, b, *, scale: float, dropout: float, rng, name: str, merge: bool = True):
    """einsum(eq, x, w) plus the adapter path (dropout only when `rng` is given); `merge`
    runs both as `contract` (2-D matmuls) rather than plain einsums."""
    dt = x.dtype
    mul = contract if merge else jnp.einsum
    y = mul(eq, x, w.astype(dt))
    if a is None:
        return y
    eq_a, eq_b, *_ = _split_eq(eq)
    xa = x
    if rng is not None and dropout > 0:
        key = jax.random.fold_in(rng, zlib.crc32(name.encode()) & 0x7FFFFFFF)
        keep = jax.random.bernoulli(key, 1.0 - dropout, x.shape)
        xa = jnp.where(keep, x / (1.0 - dropout), 0).astype(dt)
    low = mul(eq_a, xa, a.astype(dt))
    return y + scale * jnp.einsum(eq_b, low, b.astype(dt))


# ------------------------------------------------------------------ pytree helpers
def _flat(params):
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def is_adapter(path: str) -> bool:
    return path.endswith(LORA_A) or path.endswith(LORA_B)


def split(params):
    """(adapters, base): nested dicts holding the adapter leaves and the other leaves."""
    adapters, base = {}, {}
    for key, value in params.items():
        if isinstance(value, dict):
            a, b = split(value)
            if a:
                adapters[key] = a
            if b:
                base[key] = b
        elif is_adapter(str(key)):
            adapters[key] = value
        else:
            base[key] = value
    return adapters, base


def combine(adapters, base):
    """Deep union of two nested dicts (the inverse of `split`)."""
    out = dict(base)
    for key, value in adapters.items():
        out[key] = combine(value, base.get(key, {})) if isinstance(value, dict) else value
    return out


def has_adapters(params) -> bool:
    return any(is_adapter(p) for p in _flat(params))


def merge(params, lora: LoraConfig, eqs: dict[str, str]):
    """Fold every adapter into its weight and drop the adapters (for export).

    `eqs` maps a weight path (e.g. 'layers/q') to the einsum equation it is used with;
    stacked layers carry a leading axis that is vmapped over.
    """
    flat = _flat(params)
    out = {}
    for path, leaf in flat.items():
        if is_adapter(path):
            continue
        a = flat.get(path + LORA_A)
        if a is None:
            out[path] = leaf
            continue
        b = flat[path + LORA_B]
        _, _, contracted, kept, w_spec = _split_eq(eqs[path])
        free = next(c for c in "zyxwZYXW" if c not in eqs[path])
        a_spec = "".join(contracted) + free
        b_spec = free + "".join(kept)
        delta_eq = f"{a_spec},{b_spec}->{w_spec}"
        stacked = a.ndim == len(contracted) + 2
        if stacked:
            delta = jax.vmap(lambda a_, b_: jnp.einsum(delta_eq, a_.astype(jnp.float32), b_.astype(jnp.float32)))(a, b)
        else:
            delta = jnp.einsum(delta_eq, a.astype(jnp.float32), b.astype(jnp.float32))
        out[path] = (leaf.astype(jnp.float32) + lora.scale * delta).astype(leaf.dtype)
    nested: dict = {}
    for path, leaf in out.items():
        node = nested
        keys = path.split("/")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = leaf
    return nested


def count(params) -> tuple[int, int]:
    """(adapter parameters, base parameters)."""
    flat = _flat(params)
    ada = sum(int(np.prod(v.shape)) for k, v in flat.items() if is_adapter(k))
    return ada, sum(int(np.prod(v.shape)) for k, v in flat.items() if not is_adapter(k))
