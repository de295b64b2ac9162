"""One mesh, one rules table: placements, fallbacks, sharded init and the sharded forward."""
import os

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


def _topology(name, num_slices=1):
    """Compile-only TPU devices (libtpu's topology description; nothing runs on them)."""
    pytest.importorskip("libtpu")
    from jax.experimental import topologies

    # compile-only use: several processes (other test runs) may load libtpu at once
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

    kw = {"num_slices": num_slices} if num_slices > 1 else {}
    return topologies.get_topology_desc(platform="tpu", topology_name=name, **kw).devices


def _assemble(mesh, shares, axes):
    """What `global_batch` builds from every process's rows, as one numpy batch: process p's
    rows go, in order, to the global rows `batch_rows` gives it. Every global row must be filled,
    and processes that fill the same row (one data shard) must bring identical data there."""
    from embedrl_jax.sharding import batch_rows, data_shard

    count = data_shard(mesh, 0)[1]
    out = {}
    for k in shares[0]:
        b = axes[k].index("batch")
        n = shares[0][k].shape[b]
        rows = batch_rows(mesh, n * count)
        shape = list(shares[0][k].shape)
        shape[b] *= count
        out[k] = np.zeros(shape, shares[0][k].dtype)
        filled = np.zeros(shape[b], bool)
        for p, share in enumerate(shares):
            index = [slice(None)] * len(shape)
            index[b] = rows[p]
            again = filled[rows[p]]
            before = np.moveaxis(out[k], b, 0)[rows[p][again]]
            np.testing.assert_array_equal(np.moveaxis(share[k], b, 0)[again], before, err_msg=f"{k}: process {p}")
            out[k][tuple(index)] = share[k]
            filled[rows[p]] = True
        assert filled.all(), f"{k}: global rows {np.flatnonzero(~filled).tolist()} filled by no process"
    return out


def test_host_shares_join_into_one_batch(tmp_path):
    """Two hosts of a slice whose device order interleaves them (v5p:2x2x2: devices of hosts
    0, 1, 0, 1, ... along fsdp): their rows, placed where the mesh puts them, embed each sample
    as if packed alone. `host_share` moves each host's visual index to the global patch rows
    its own patch rows land on; the old process-order shift would feed samples other images."""
    from embedrl_jax.hf import BATCH_AXES
    from embedrl_jax.models.qwen3_vl.inputs import Buckets, host_share, hosts_shape, pack_chunks
    from embedrl_jax.sharding import batch_rows

    topo_mesh = make_mesh(MeshConfig(1, -1, 1), devices=_topology("v5p:2x2x2"))
    assert [d.process_index for d in topo_mesh.devices.flat] == [0, 1] * 4
    tiny_hf_model().save_pretrained(tmp_path)
    handle = embedrl_jax.load_hf(tmp_path)
    cfg = handle.model_config
    names = ["astronaut", "coffee", "chelsea", "rocket"]
    hosts = [build_inputs([[2 + i, ("image", real_image(names[(i + h) % 4], (64, 64 + 32 * ((i + h) % 2)))), 3]
                           if (i + h) % 3 else [5 + i] for i in range(4)], rng=np.random.default_rng(h))
             for h in range(2)]
    shape = hosts_shape(cfg, hosts, Buckets(), topo_mesh)  # one process here: the max over both hosts' batches
    assert shape[1][0] % 4 == 0  # patch rows split over each host's 4 batch devices
    packed = [{k: v[0] for k, v in pack_chunks(cfg, [x], shape=shape).items()} for x in hosts]
    hidden = jax.jit(handle.model_def.hidden)
    alone = [np.asarray(hidden(handle.params, p)) for p in packed]
    joined = np.asarray(hidden(handle.params, _assemble(
        topo_mesh, [host_share(cfg, p, topo_mesh, i) for i, p in enumerate(packed)], BATCH_AXES)))
    rows = batch_rows(topo_mesh, 8)
    assert rows[0].tolist() == [0, 2, 4, 6]
    for h in range(2):
        np.testing.assert_allclose(joined[rows[h]], alone[h], atol=1e-5, rtol=0)
    # the process-order shift (host p's patch rows taken as one block after host p-1's) is wrong here
    unit_rows = shape[1][0] * shape[1][1] // cfg.vision.merge_unit
    old = [dict(p, visual_index=np.where(p["visual_index"] >= 0, p["visual_index"] + h * unit_rows, -1))
           for h, p in enumerate(packed)]
    naive = np.asarray(hidden(handle.params, _assemble(topo_mesh, old, BATCH_AXES)))
    assert max(np.abs(naive[rows[h]] - alone[h]).max() for h in range(2)) > 1e-2


# (topology, slices, mesh, chips, hosts, data shards): jax.make_mesh lays tensor=4 over two hosts'
# chips on v5p and v5e (each host has 2x2 chips), and tensor=8 over four hosts on v5e:16x16
MESHES = [
    pytest.param("v5p:4x4x4", 1, MeshConfig(1, -1, 1), 64, 16, 16, id="v5p-4x4x4-fsdp"),
    pytest.param("v5p:4x4x4", 1, MeshConfig(4, -1, 1), 64, 16, 16, id="v5p-4x4x4-data4"),
    pytest.param("v5p:4x4x4", 1, MeshConfig(1, -1, 4), 64, 16, 8, id="v5p-4x4x4-tensor4"),
    pytest.param("v5e:16x16", 1, MeshConfig(1, -1, 1), 256, 64, 64, id="v5e-16x16-fsdp"),
    pytest.param("v5e:16x16", 1, MeshConfig(16, -1, 1), 256, 64, 64, id="v5e-16x16-data16"),
    pytest.param("v5e:16x16", 1, MeshConfig(1, -1, 8), 256, 64, 16, id="v5e-16x16-tensor8"),
    pytest.param("v5p:2x4x4", 2, MeshConfig(1, -1, 1, slices=2), 64, 16, 16, id="2-slices-v5p-2x4x4-fsdp"),
    pytest.param("v5p:2x4x4", 2, MeshConfig(1, -1, 2, slices=2), 64, 16, 16, id="2-slices-v5p-2x4x4-tensor2"),
    pytest.param("v5p:2x4x4", 2, MeshConfig(1, -1, 4, slices=2), 64, 16, 8, id="2-slices-v5p-2x4x4-tensor4"),
]


@pytest.mark.parametrize("topology,slices,config,chips,hosts,n_shards", MESHES)
def test_every_batch_row_is_filled_by_the_processes_owning_its_devices(topology, slices, config, chips, hosts,
                                                                      n_shards):
    """Host-side row assignment on real TPU device orders (many hosts): each global row of a
    batch is filled by exactly the processes whose devices hold it; processes sharing rows form
    one data shard, load the same samples and so bring identical data; the global batch holds
    every sample of the step once; the visual index follows its patch rows."""
    from types import SimpleNamespace

    from embedrl_jax.models.qwen3_vl.inputs import host_share
    from embedrl_jax.sharding import _batch_devices, batch_rows, batch_split_per_host, data_shard, rows_by_process

    devices = _topology(topology, slices)
    mesh = make_mesh(config, devices=devices)
    assert len(devices) == chips and len({d.process_index for d in devices}) == hosts
    shard = {p: data_shard(mesh, p) for p in range(hosts)}
    assert {c for _, c in shard.values()} == {n_shards}
    assert sorted({i for i, _ in shard.values()}) == list(range(n_shards))
    if n_shards == hosts:  # every host holds rows of its own: its shard is its process index
        assert all(shard[p] == (p, hosts) for p in range(hosts))
    n_rows = 3 * _batch_devices(mesh)
    shares = batch_rows(mesh, n_rows)
    assert sorted(shares) == list(range(hosts))
    sharding = jax.sharding.NamedSharding(mesh, logical_to_spec(("batch",), (n_rows,), mesh))
    holders = [set() for _ in range(n_rows)]
    for device, (index,) in sharding.devices_indices_map((n_rows,)).items():
        for r in range(n_rows)[index]:
            holders[r].add(device.process_index)
    for r, procs in enumerate(holders):  # filled by exactly the processes whose devices hold it
        assert procs == {p for p, rows in shares.items() if r in rows}, r
        assert len({shard[p][0] for p in procs}) == 1, (r, procs)  # ... all of one data shard
    assert max(map(len, holders)) == hosts // n_shards
    assert rows_by_process(sharding, (n_rows, 5), 0).keys() == shares.keys()
    if n_shards == hosts:  # the device order interleaves the hosts: a contiguous-block layout would fail
        assert any(np.any(np.diff(r) != 1) for r in shares.values())

    # the trainers' split: shard i loads the i-th contiguous share of the step's samples; placed
    # where the mesh puts each process's rows, the global batch holds every sample once
    samples = np.arange(n_rows) + 100
    per = n_rows // n_shards
    local = [{"ids": samples[shard[p][0] * per:(shard[p][0] + 1) * per]} for p in range(hosts)]
    glob = _assemble(mesh, local, {"ids": ("batch",)})  # also checks shared rows get identical data
    np.testing.assert_array_equal(np.sort(glob["ids"]), samples)

    # visual index: host p's merged token m (local patch row m // per_row) must point at the
    # same patch content in the assembled global patch rows
    unit, per_row = 4, 3
    cfg = SimpleNamespace(vision=SimpleNamespace(merge_unit=unit))
    rows = 2 * batch_split_per_host(mesh)
    local = []
    for p in range(hosts):  # a shard's processes pack the same samples
        i = shard[p][0]
        rng = np.random.default_rng(i)
        patches = (i * 1000 + np.arange(rows * per_row * unit, dtype=np.float32)).reshape(rows, per_row * unit, 1)
        vi = rng.integers(-1, rows * per_row, size=(2 * rows, 7)).astype(np.int32)
        local.append(dict(patches=patches, visual_index=vi))
    axes = {"patches": ("batch", None, None), "visual_index": ("batch", None)}
    glob = _assemble(mesh, [host_share(cfg, a, mesh, p) for p, a in enumerate(local)], axes)
    merged = glob["patches"].reshape(-1, unit)[:, 0]  # first patch of each merged token
    rows_of = batch_rows(mesh, 2 * rows * n_shards)
    for p, a in enumerate(local):
        want = np.where(a["visual_index"] >= 0, a["patches"].reshape(-1, unit)[:, 0][a["visual_index"]], -1)
        vi = glob["visual_index"][rows_of[p]]
        np.testing.assert_array_equal(np.where(vi >= 0, merged[vi], -1), want)


def test_rows_shared_by_hosts_form_one_data_shard_and_partial_overlaps_are_refused():
    """A tensor axis across hosts makes those hosts one data shard; rows that two hosts share
    only in part cannot be given identical data by any split and are refused naming both."""
    from jax.sharding import Mesh

    from embedrl_jax.sharding import batch_rows, batch_split_per_host, data_shard

    mesh = make_mesh(MeshConfig(1, -1, 4), devices=_topology("v5p:4x4x4"))
    pairs = {tuple(sorted({d.process_index for d in mesh.devices[0, f, :]})) for f in range(mesh.shape["fsdp"])}
    assert {len(p) for p in pairs} == {2}  # make_mesh's tensor groups span two hosts
    for a, b in pairs:
        assert data_shard(mesh, a) == data_shard(mesh, b)
    assert batch_split_per_host(mesh) == 2  # 16 fsdp positions over 8 shards

    devices = _topology("v5p:2x2x2")
    h0, h1 = ([d for d in devices if d.process_index == p] for p in (0, 1))
    grid = np.array([[[h0[0], h1[0]], [h0[1], h1[1]], [h0[2], h1[2]], [h0[3], h1[3]]]])  # every row on both
    mesh = Mesh(grid, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    assert data_shard(mesh, 0) == data_shard(mesh, 1) == (0, 1)
    assert batch_rows(mesh, 8)[1].tolist() == list(range(8))
    grid = np.array([[[h0[0], h0[1]], [h0[2], h1[0]], [h1[1], h1[2]], [h1[3], h0[3]]]])  # rows 1 and 3 on both
    mesh = Mesh(grid, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    with pytest.raises(ValueError, match="processes 0 and 1 share some rows of 8 but not all"):
        batch_rows(mesh, 8)
    with pytest.raises(ValueError, match="process 5 owns no device of this mesh"):
        data_shard(make_mesh(MeshConfig(), devices=devices), 5)


def test_global_batch_refuses_a_batch_it_cannot_split_over_hosts():
    from embedrl_jax.sharding import global_batch

    mesh = make_mesh(MeshConfig(1, -1, 1), devices=_topology("v5p:2x2x2"))  # 2 hosts, this process is 0
    arrays = {"input_ids": np.zeros((1, 8), np.int32)}  # 2 rows in all, over 8 batch devices
    with pytest.raises(ValueError, match=r"input_ids: a global batch of 2 rows \(2 data shards x 1\)"):
        global_batch(mesh, arrays, {"input_ids": ("batch", None)})


def test_two_slice_mesh_keeps_fsdp_and_tensor_inside_a_slice():
    """slices=2 over two v5p:2x4x4 slices (compile-only): data crosses the slices, fsdp and
    tensor never do; counts that do not match the devices name both numbers."""
    devices = _topology("v5p:2x4x4", num_slices=2)
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1, slices=2), devices=devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 32, "tensor": 1}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    grid = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (grid[0] == 0).all() and (grid[1] == 1).all()
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=4, slices=2), devices=devices)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 4, "tensor": 4}
    grid = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (grid[:2] == 0).all() and (grid[2:] == 1).all()
    assert logical_to_spec(("batch", "embed"), (64, 256), mesh) == P(("data", "fsdp"), None)
    assert logical_to_spec(("embed", "mlp"), (256, 512), mesh) == P("fsdp", "tensor")  # weights inside a slice
    with pytest.raises(ValueError, match="mesh.slices=4 but the 64 devices form 2 slice"):
        make_mesh(MeshConfig(slices=4), devices=devices)
    with pytest.raises(ValueError, match="64 devices form 2 TPU slices but mesh.slices=1"):
        make_mesh(MeshConfig(), devices=devices)
    with pytest.raises(ValueError, match="mesh.slices=3 does not divide the 64 devices"):
        make_mesh(MeshConfig(slices=3), devices=devices)
    with pytest.raises(ValueError, match="needs 64 devices per slice .2 slices., have 32"):
        make_mesh(MeshConfig(data=4, fsdp=16, slices=2), devices=devices)


def test_two_slice_batch_rows_are_filled_once_by_their_hosts():
    from embedrl_jax.sharding import batch_rows

    devices = _topology("v5p:2x4x4", num_slices=2)
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1, slices=2), devices=devices)
    shares = batch_rows(mesh, 128)
    assert len(shares) == 16
    np.testing.assert_array_equal(np.sort(np.concatenate(list(shares.values()))), np.arange(128))
    slice_of = {d.process_index: d.slice_index for d in devices}
    for p, rows in shares.items():  # slice 0's hosts fill the first half of the batch
        assert ((rows < 64) == (slice_of[p] == 0)).all()
