"""One mesh, one rules table: placements, fallbacks, sharded init and the sharded forward."""
import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

import embedrl_jax
from embedrl_jax.hf import param_shardings
from embedrl_jax.models.qwen3_vl.config import Qwen3VLConfig
from embedrl_jax.models.qwen3_vl.model import init_params, model_def
from embedrl_jax.sharding import MeshConfig, logical_to_spec, make_mesh
from tiny import build_inputs, real_image, tiny_hf_config, tiny_hf_model


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig(2, 2, 2))


def test_mesh_axes_are_auto(mesh):
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == (2, 2, 2)
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert make_mesh(MeshConfig(data=2, fsdp=-1, tensor=1)).shape["fsdp"] == 4
    with pytest.raises(ValueError, match="needs 12 devices"):
        make_mesh(MeshConfig(3, 2, 2))


def test_rules_fall_back_to_replicated(mesh):
    assert logical_to_spec(("embed", "heads", "head_dim"), (64, 4, 16), mesh) == P("fsdp", "tensor", None)
    # 3 heads do not divide over tensor=2: replicate that dim
    assert logical_to_spec(("embed", "heads", "head_dim"), (64, 3, 16), mesh) == P("fsdp", None, None)
    # batch takes data and fsdp; a later embed dim may not reuse fsdp
    assert logical_to_spec(("batch", "embed"), (8, 64), mesh) == P(("data", "fsdp"), None)
    assert logical_to_spec(("batch", "seq"), (2, 5), mesh) == P(None, None)
    with pytest.raises(KeyError, match="no sharding rule"):
        logical_to_spec(("nonsense",), (4,), mesh)


def _tiny_cfg(tie=False):
    return Qwen3VLConfig.from_hf_dict(tiny_hf_config(tie=tie).to_dict())


def test_sharded_init_creates_params_in_their_shards(mesh):
    mdef = model_def(_tiny_cfg())
    shardings = param_shardings(mdef, mesh)
    params = init_params(mdef, jax.random.key(0), shardings)
    q = params["layers"]["q"]  # [layers=2, embed=64, heads=4, head_dim=16]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert {s.data.shape for s in q.addressable_shards} == {(2, 32, 2, 16)}
    emb = params["embed"]  # [vocab=306, embed=64]
    assert emb.sharding.spec == P("tensor", "fsdp")
    assert {s.data.shape for s in emb.addressable_shards} == {(153, 32)}
    for leaf, sh in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
        assert leaf.sharding == sh


def test_sharded_forward_equals_single_device(mesh, tmp_path):
    model = tiny_hf_model()
    model.save_pretrained(tmp_path)
    single = embedrl_jax.load_hf(tmp_path)
    sharded = embedrl_jax.load_hf(tmp_path, mesh=mesh)
    # each large weight is split as the rules say, streamed straight into shards
    up = sharded.params["layers"]["up"]  # [2, D=64, F=128] -> (None, fsdp, tensor)
    assert up.sharding.spec == P(None, "fsdp", "tensor")
    for shard in up.addressable_shards:
        np.testing.assert_array_equal(shard.data, np.asarray(single.params["layers"]["up"])[shard.index])
    fc1 = sharded.params["visual"]["blocks"]["fc1"]  # [2, Dv=32, Fv=64]
    assert {s.data.shape for s in fc1.addressable_shards} == {(2, 16, 32)}
    inputs = build_inputs(
        [
            [4, ("image", real_image("astronaut", (96, 64))), 3],
            [2, ("image", real_image("coffee", (64, 128))), 6],
            [9],
            [1, ("image", real_image("chelsea", (64, 64))), 1, ("image", real_image("rocket", (64, 96)))],
        ]
    )
    batch, _ = sharded.prepare(**inputs)
    assert batch["input_ids"].sharding.spec == P(("data", "fsdp"), None)
    np.testing.assert_allclose(sharded.logits(**inputs), single.logits(**inputs), atol=1e-5, rtol=0)


def test_host_shares_join_into_one_batch(tmp_path):
    """Two hosts' separately packed rows, side by side, embed each sample as if packed alone:
    `host_share` moves the second host's visual index past the first host's patch rows."""
    from embedrl_jax.hf import BATCH_AXES
    from embedrl_jax.models.qwen3_vl.inputs import batches_shape, host_share, pack_chunks

    tiny_hf_model().save_pretrained(tmp_path)
    handle = embedrl_jax.load_hf(tmp_path)
    cfg = handle.model_config
    a = build_inputs([[4, ("image", real_image("astronaut", (96, 64))), 3]], rng=np.random.default_rng(1))
    b = build_inputs([[2, ("image", real_image("coffee", (64, 128))), 6]], rng=np.random.default_rng(2))
    shape = batches_shape(cfg, [a, b])  # what hosts_shape agrees on
    packed = [pack_chunks(cfg, [x], shape=shape) for x in (a, b)]

    def hidden(arrays):
        return np.asarray(jax.jit(handle.model_def.hidden)(handle.params, {k: v[0] for k, v in arrays.items()}))

    def join(first, second):
        return {k: np.concatenate([first[k], second[k]], axis=1 + BATCH_AXES[k].index("batch")) for k in first}

    alone = [hidden(p) for p in packed]
    joined = hidden(join(packed[0], host_share(cfg, packed[1], 1)))
    np.testing.assert_allclose(joined, np.concatenate(alone), atol=1e-5, rtol=0)
    naive = hidden(join(*packed))  # without the shift the second sample sees the first one's image
    assert np.abs(naive[1] - alone[1][0]).max() > 1e-2


def test_global_batch_refuses_a_batch_it_cannot_split_over_hosts(mesh, monkeypatch):
    from embedrl_jax.sharding import global_batch

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    arrays = {"input_ids": np.zeros((1, 8), np.int32)}  # 2 rows in all, over 4 batch devices
    with pytest.raises(ValueError, match="input_ids: a global batch of 2 rows"):
        global_batch(mesh, arrays, {"input_ids": ("batch", None)})
