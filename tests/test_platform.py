"""Per-platform lowering choices follow the target devices; the rolled layer scan (the
accelerators' path) and every remat policy give the same numbers as the CPU path."""
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies

import embedrl_jax
from embedrl_jax.models import platform
from embedrl_jax.models.platform import REMAT, Target, current_target, remat_name, target_of
from embedrl_jax.models.qwen3_vl.config import Qwen3VLConfig
from embedrl_jax.models.qwen3_vl.inputs import pack_inputs
from embedrl_jax.models.qwen3_vl.model import init_params, model_def
from embedrl_jax.sharding import MeshConfig, make_mesh, named_sharding, tree_shardings
from tiny import build_inputs, real_image, tiny_hf_config

CPU, TPU = Target("cpu"), Target("tpu")


def _config(layers=2):
    # the layer loop and remat under test, with one attention kernel on every target (splash on a
    # CPU-run TPU target would be Pallas interpret mode: tests/test_attention.py covers it)
    return Qwen3VLConfig.from_hf_dict(tiny_hf_config(text_layers=layers).to_dict()).replace(attention="xla")


def _tiny(samples):
    cfg = _config()
    mdef = model_def(cfg)
    params = init_params(mdef, jax.random.key(0))
    inputs = build_inputs(samples, padding_side="left")
    arrays, _ = pack_inputs(cfg, **inputs, pad_to=inputs["input_ids"].shape[1])
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}
    probe = jax.random.normal(jax.random.key(1), batch["input_ids"].shape + (cfg.text.hidden_size,))
    return mdef, params, batch, probe


@pytest.fixture(scope="module")
def tiny():
    return _tiny([[5, ("image", real_image("astronaut", (64, 64))), 4], [9]])


@pytest.fixture(scope="module")
def tiny_text():
    return _tiny([[12], [7]])


def _loss_and_grad(tiny, target, remat=False):
    mdef, params, batch, probe = tiny

    def loss(p):
        h = mdef.hidden(p, batch, target=target, remat=remat)
        return jnp.sum(h * probe * batch["attention_mask"][..., None])

    return jax.jit(jax.value_and_grad(loss))(params)


def _tpu_devices(name="v5e:2x2"):
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu's lockfile
    return topologies.get_topology_desc(platform="tpu", topology_name=name).devices


def test_target_follows_the_mesh_not_the_host():
    assert current_target() == CPU  # no mesh: the default device
    cpu_mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    tpu_mesh = make_mesh(MeshConfig(fsdp=-1), _tpu_devices())
    assert target_of(cpu_mesh) == CPU and target_of(tpu_mesh) == TPU
    with jax.set_mesh(tpu_mesh):
        assert current_target() == TPU
    assert (CPU.unroll_layers, CPU.decode_layer_loop, CPU.default_remat) == (True, "unrolled", "none")
    assert (TPU.unroll_layers, TPU.decode_layer_loop, TPU.default_remat) == (False, "scan", "full")
    assert CPU.attention_rows(64, 2**20) == 8 and TPU.attention_rows(64, 2**20) == 64
    with pytest.raises(ValueError, match="target platform"):
        Target("metal")


def test_no_host_backend_queries_in_the_package():
    root = pathlib.Path(embedrl_jax.__file__).parent
    hits = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"default_backend\s*\(", line)]
    assert hits == []


def test_remat_names():
    assert [remat_name(r, CPU) for r in (True, False, None, "auto")] == ["full", "none", "none", "none"]
    assert [remat_name(r, TPU) for r in (None, "auto", "dots", False)] == ["full", "full", "dots", "none"]
    with pytest.raises(ValueError, match="remat must be one of"):
        remat_name("sometimes", TPU)


def _assert_scan_equals_unrolled(tiny):
    mdef, params, batch, _ = tiny
    mask = np.asarray(batch["attention_mask"], bool)
    h_cpu = np.asarray(jax.jit(lambda p: mdef.hidden(p, batch, target=CPU))(params))
    h_tpu = np.asarray(jax.jit(lambda p: mdef.hidden(p, batch, target=TPU))(params))
    np.testing.assert_allclose(h_tpu[mask], h_cpu[mask], atol=1e-5, rtol=1e-5)
    (l_cpu, g_cpu), (l_tpu, g_tpu) = _loss_and_grad(tiny, CPU), _loss_and_grad(tiny, TPU)
    np.testing.assert_allclose(l_tpu, l_cpu, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_cpu)[0], jax.tree.leaves(g_tpu)):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_rolled_scan_equals_unrolled_text(tiny_text):
    """The accelerators' choices (rolled scan, all attention rows at once) run on CPU equal the
    CPU choices, forward and gradients."""
    _assert_scan_equals_unrolled(tiny_text)


@pytest.mark.slow
def test_rolled_scan_equals_unrolled_with_an_image(tiny):
    """As above through the vision tower's segmented block scans and DeepStack."""
    _assert_scan_equals_unrolled(tiny)


@pytest.mark.parametrize("remat", [r for r in REMAT if r != "none"])
def test_remat_policies_keep_gradients(tiny_text, remat):
    """Each policy on the rolled-scan path (accelerators') against no remat (text only: the
    vision tower runs through the same `scan_layers`)."""
    loss0, g0 = _loss_and_grad(tiny_text, TPU, "none")
    loss1, g1 = _loss_and_grad(tiny_text, TPU, remat)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g0)[0], jax.tree.leaves(g1)):
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


def _lowered_train_text(layers, devices):
    """Forward + backward of a text-only tiny model, lowered for a mesh of `devices`."""
    mdef = model_def(_config(layers))
    mesh = make_mesh(MeshConfig(fsdp=-1), devices)
    p_sh = tree_shardings(mdef.param_axes(), mdef.abstract_params(), mesh)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), mdef.abstract_params(), p_sh)
    b, length = 4, 32
    batch = {
        "input_ids": jax.ShapeDtypeStruct((b, length), jnp.int32, sharding=named_sharding(("batch", None), (b, length), mesh)),
        "attention_mask": jax.ShapeDtypeStruct((b, length), jnp.int32, sharding=named_sharding(("batch", None), (b, length), mesh)),
        "positions": jax.ShapeDtypeStruct((3, b, length), jnp.int32,
                                          sharding=named_sharding((None, "batch", None), (3, b, length), mesh)),
    }
    seen = []

    def loss(p, batch):
        seen.append(platform.current_target())
        return jnp.mean(mdef.hidden(p, batch, dtype=jnp.bfloat16, remat="auto").astype(jnp.float32) ** 2)

    with jax.set_mesh(mesh):
        lowered = jax.jit(jax.grad(loss)).lower(params, batch)
    return lowered, seen


def test_compile_for_tpu_from_this_host_takes_the_scan_path():
    """Lowered for compile-only TPU chips the program is the same at 2 and 4 layers (one rolled
    loop); lowered for CPU devices it grows with depth (unrolled)."""
    tpu = _tpu_devices()
    low2, seen = _lowered_train_text(2, tpu)
    low4, _ = _lowered_train_text(4, tpu)
    assert seen == [TPU] and "stablehlo.while" in low2.as_text()
    assert len(low2.as_text()) == len(low4.as_text())
    cpu2, cpu_seen = _lowered_train_text(2, jax.devices()[:4])
    cpu4, _ = _lowered_train_text(4, jax.devices()[:4])
    assert cpu_seen == [CPU] and len(cpu4.as_text()) > len(cpu2.as_text())
    compiled = low2.compile()  # the real TPU compiler, no TPU
    assert " while(" in compiled.as_text()  # the layer loop survives TPU optimisation
