"""LoRA adapters: targets by path pattern, zero-init identity, dropout, merging for export."""
import re

import jax
import numpy as np
import pytest

import embedrl_jax
from embedrl_jax import lora
from embedrl_jax.lora import LoraConfig
from embedrl_jax.models.qwen3_vl.model import init_adapters, model_def
from tiny import build_inputs, real_image, tiny_hf_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    tiny_hf_model().save_pretrained(path)
    handle = embedrl_jax.load_hf(path)
    cfg = LoraConfig(rank=4, alpha=8.0, dropout=0.1)
    mdef = model_def(handle.model_config, cfg)
    adapters = init_adapters(mdef, jax.random.key(0))
    inputs = build_inputs([[5, ("image", real_image("astronaut", (96, 64))), 4], [9]])
    batch, _ = handle.prepare(**inputs)
    return handle, mdef, adapters, batch


def _paths(tree):
    return {"/".join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_targets_follow_the_patterns(setup):
    _, mdef, adapters, _ = setup
    paths = _paths(adapters)
    weights = {p.rsplit("_lora_", 1)[0] for p in paths}
    assert weights == {
        *(f"layers/{n}" for n in ("q", "k", "v", "o", "gate", "up", "down")),
        *(f"visual/blocks/{n}" for n in ("q", "k", "v", "o", "fc1", "fc2")),
        "visual/merger/fc1", "visual/merger/fc2", "visual/deepstack/fc1", "visual/deepstack/fc2",
    }
    assert not any(p.startswith(("embed", "lm_head", "visual/patch", "visual/pos")) for p in weights)
    assert adapters["layers"]["q_lora_a"].shape == (2, 64, 4)  # [layers, embed, rank]
    assert adapters["layers"]["q_lora_b"].shape == (2, 4, 4, 16)  # [layers, rank, heads, head_dim]
    only_text = model_def(mdef.config, LoraConfig(rank=2, targets=(r"^layers/(q|v)$",)))
    assert {p.rsplit("_lora_", 1)[0] for p in _paths(init_adapters(only_text, jax.random.key(1)))} == {"layers/q", "layers/v"}


@pytest.mark.slow
def test_fresh_adapters_are_the_identity_and_merge_reproduces_lora(setup):
    handle, mdef, adapters, batch = setup
    params = lora.combine(adapters, handle.params)
    base_hidden = jax.jit(handle.model_def.hidden)(handle.params, batch)
    fresh = jax.jit(mdef.hidden)(params, batch)
    np.testing.assert_allclose(fresh, base_hidden, atol=1e-5)  # B = 0: equal up to float32 rounding of two programs
    # train-like adapters: random B
    keys = iter(jax.random.split(jax.random.key(2), 100))
    trained = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.05 * jax.random.normal(next(keys), x.shape) if str(p[-1].key).endswith("_lora_b") else x, params)
    lora_hidden = jax.jit(mdef.hidden)(trained, batch)
    assert np.abs(lora_hidden - base_hidden).max() > 1e-3  # adapters matter
    merged_def, merged = mdef.merged(trained)
    assert not lora.has_adapters(merged)
    np.testing.assert_allclose(jax.jit(merged_def.hidden)(merged, batch), lora_hidden, atol=1e-5)
    # dropout only with an rng, and reproducible for a given key
    h1 = jax.jit(mdef.hidden)(trained, batch, rng=jax.random.key(3))
    h2 = jax.jit(mdef.hidden)(trained, batch, rng=jax.random.key(3))
    np.testing.assert_array_equal(h1, h2)
    assert np.abs(h1 - lora_hidden).max() > 1e-4


def test_split_and_count(setup):
    handle, mdef, adapters, _ = setup
    params = lora.combine(adapters, handle.params)
    ada, base = lora.split(params)
    assert lora.count(params)[1] == sum(x.size for x in jax.tree.leaves(handle.params))
    assert lora.count(params)[0] == sum(x.size for x in jax.tree.leaves(adapters)) > 0
    assert jax.tree.structure(lora.combine(ada, base)) == jax.tree.structure(params)
    assert jax.tree.structure(base) == jax.tree.structure(handle.params)


@pytest.mark.parametrize("eq, x_shape, w_shape, two_d", [
    ("btd,df->btf", (2, 3, 4), (4, 5), True),          # leading dims merged into rows
    ("btnh,nhd->btd", (2, 3, 4, 5), (4, 5, 6), True),   # two contracted dims merged
    ("btd,dnh->btnh", (2, 3, 4), (4, 5, 6), True),
    ("bd,df->bf", (3, 4), (4, 5), True),               # already a plain matmul
    ("rnsh,nhd->rsd", (2, 4, 3, 5), (4, 5, 6), False),  # contracted dims not trailing x
    ("rsd,dnh->rnsh", (2, 3, 4), (4, 5, 6), False),     # output not in x-then-w order
    ("bij,bjk->bik", (2, 3, 4), (2, 4, 5), False),      # a batch dim shared by x and w
])
def test_contract_equals_einsum_with_its_gradients(eq, x_shape, w_shape, two_d):
    import jax.numpy as jnp

    key = jax.random.key(0)
    x = jax.random.normal(key, x_shape)
    w = jax.random.normal(jax.random.fold_in(key, 1), w_shape)
    np.testing.assert_allclose(lora.contract(eq, x, w), jnp.einsum(eq, x, w), rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda a, b: jnp.sum(jnp.sin(lora.contract(eq, a, b))), argnums=(0, 1))(x, w)
    ref = jax.grad(lambda a, b: jnp.sum(jnp.sin(jnp.einsum(eq, a, b))), argnums=(0, 1))(x, w)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    # the merged form is one 2-D dot (no multi-dim dot_general left for XLA to relayout)
    hlo = jax.jit(lambda a, b: lora.contract(eq, a, b)).lower(x, w).as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line]
    assert len(dots) == 1
    ranks = [t.count("x") for t in re.findall(r"tensor<([^>]*)>", dots[0].split(":")[-1])]
    assert (max(ranks) == 2) == two_d, dots[0]
