"""Attention backends (models/qwen3_vl/attention.py): splash in Pallas interpret mode against xla (kernel and
whole model), a splash train step compiled for a compile-only TPU topology, the layout handed to
cuDNN, the padding rule that leaves no query row without a key, and bad input."""
import dataclasses
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies

import embedrl_jax
from embedrl_jax.errors import ConfigError, UserError
from embedrl_jax.models.qwen3_vl import attention as attn
from embedrl_jax.models.qwen3_vl.attention import Layout, attend, splash_attention
from embedrl_jax.models.platform import Target
from embedrl_jax.models.qwen3_vl.config import Qwen3VLConfig
from embedrl_jax.models.qwen3_vl.inputs import Buckets, pack_inputs
from embedrl_jax.models.qwen3_vl.model import model_def
from embedrl_jax.models.qwen3_vl.text import text_segments
from embedrl_jax.reason.sequences import with_completions
from embedrl_jax.sharding import MeshConfig, make_mesh, named_sharding
from embedrl_jax.train.core import TrainerConfig
from tiny import build_inputs, real_image, tiny_hf_config, tiny_hf_model

CPU = Target("cpu")
TOL = 1e-5
# jitted: eager op-by-op dispatch of the row map costs seconds on 2 cores
attend_jit = jax.jit(attend, static_argnames=("layout", "attention", "target"))


def _qkv(b, n, k, length, h, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, n, length, h), jnp.float32)
    kk = jax.random.normal(keys[1], (b, k, length, h), jnp.float32)
    v = jax.random.normal(keys[2], (b, k, length, h), jnp.float32)
    return q, kk, v


def _text_seg(length, pads, side):
    rows = []
    for p in pads:
        valid = np.ones(length, np.int32)
        if p:
            valid[:p] = 0 if side == "left" else 1
            if side == "right":
                valid[length - p:] = 0
        rows.append(valid)
    return text_segments(jnp.asarray(np.stack(rows)))


def _vision_seg(length, frames):
    rows = []
    for sizes in frames:
        seg = np.full(length, -1, np.int32)
        o = 0
        for i, n in enumerate(sizes):
            seg[o:o + n] = i
            o += n
        rows.append(seg)
    return jnp.asarray(np.stack(rows))


def _both(q, k, v, seg, causal, interpret=True):
    """(xla, splash) outputs and gradients of a weighted sum, for one layout."""
    w = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)
    layout = Layout(causal=causal)

    def run(kind):
        def loss(q, k, v):
            if kind == "xla":
                out = attend(q, k, v, seg, seg, layout=layout, attention="xla", target=CPU)
            else:
                out = splash_attention(q, k, v, seg, seg, causal=causal, interpret=interpret)
            return jnp.sum(out * w), out
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return out, grads

    return run("xla"), run("splash")


def _max_diffs(ref, got):
    (o1, g1), (o2, g2) = ref, got
    return float(jnp.abs(o1 - o2).max()), max(float(jnp.abs(a - b).max()) for a, b in zip(g1, g2))


# ------------------------------------------------------------------ kernel parity (interpret mode)
@pytest.mark.parametrize("name", ["text_left_pad_gqa", "text_right_pad_gqa", "vision_packed_segments"])
def test_splash_interpret_equals_xla(name):
    """fp32 splash (Pallas interpret mode) = xla to 1e-5, forward and gradients. Left padding at
    384 tokens runs 3x3 blocks of 128 (online softmax across blocks, causal block skipping)."""
    if name.startswith("text"):
        length = 384 if "left" in name else 256
        q, k, v = _qkv(2, 4, 2, length, 64)
        seg = _text_seg(length, [37, 0], "left" if "left" in name else "right")
        assert attn.splash_block(length) == (128 if length == 384 else 256)
        causal = True
    else:
        q, k, v = _qkv(2, 4, 4, 256, 64)
        seg = _vision_seg(256, [[64, 100, 36], [144]])  # packed frames + padding patches (-1)
        causal = False
    ref, got = _both(q, k, v, seg, causal)
    fwd, grad = _max_diffs(ref, got)
    print(f"{name}: max |diff| forward {fwd:.2e}, gradients {grad:.2e}")
    assert fwd <= TOL and grad <= TOL, (fwd, grad)


def test_splash_sharded_over_batch_and_heads_with_unshardable_kv_heads():
    """Under a (data 2, fsdp 2, tensor 2) mesh splash runs in shard_map over batch and heads; one KV
    head (not divisible by tensor=2) is repeated per query head; a length of 200 (not a multiple of
    128) is padded inside and cut back."""
    q, k, v = _qkv(4, 2, 1, 200, 64, seed=3)
    seg = _text_seg(200, [0, 17, 5, 0], "left")
    mesh = make_mesh(MeshConfig(2, 2, 2))
    ref = attend_jit(q, k, v, seg, seg, layout=Layout(causal=True), attention="xla", target=CPU)
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda q, k, v, s: splash_attention(q, k, v, s, s, causal=True, interpret=True))
        lowered = fn.lower(q, k, v, seg)
        out = fn(q, k, v, seg)
    assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
    assert out.shape == ref.shape
    assert float(jnp.abs(out - ref).max()) <= TOL


def test_no_query_row_is_left_without_a_key():
    """A left-padding query sees the padding before it and itself (its own value at position 0),
    not a uniform average over every key (what an empty row's softmax gave)."""
    q, k, v = _qkv(1, 2, 1, 16, 8)
    seg = _text_seg(16, [4], "left")
    out = attend_jit(q, k, v, seg, seg, layout=Layout(causal=True), attention="xla", target=CPU)
    np.testing.assert_allclose(out[0, :, 0], jnp.broadcast_to(v[0, 0, 0], (2, 8)), atol=1e-6)
    assert bool(jnp.isfinite(out).all())
    # vision padding patches (-1) attend among themselves; real frames never see them
    seg = _vision_seg(16, [[5, 6]])
    out = attend_jit(q, k, v, seg, seg, layout=Layout(causal=False), attention="xla", target=CPU)
    probs = jax.nn.softmax(jnp.einsum("nlh,mh->nlm", q[0], k[0, 0]) * 8**-0.5 + jnp.where(
        seg[0][:, None] == seg[0][None, :], 0.0, -1e30), axis=-1)
    np.testing.assert_allclose(out[0], jnp.einsum("nlm,mh->nlh", probs, v[0, 0]), atol=1e-5)


# ------------------------------------------------------------------ whole model
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    tiny_hf_model().save_pretrained(path)
    return path


def test_load_hf_splash_logits_equal_xla(tiny_dir, caplog):
    """Whole-model logits with attention="splash" (interpret) = "xla" to 1e-4 on the tiny model
    (left-padded batch of two with images: text causal segments and packed vision segments); the
    splash handle pads to splash's 128 multiple, and interpret mode says so once."""
    inputs = build_inputs([[4, ("image", real_image("astronaut", (96, 64))), 3],
                           [2, ("image", real_image("coffee", (64, 128))), 20]], padding_side="left")
    xla = embedrl_jax.load_hf(tiny_dir, attention="xla")
    attn._warned.discard("splash-interpret")
    with caplog.at_level(logging.WARNING, logger="embedrl_jax.models.qwen3_vl.attention"):
        splash = embedrl_jax.load_hf(tiny_dir, attention="splash")
        batch, _ = splash.prepare(**inputs)
        out = splash.logits(**inputs)
    assert batch["input_ids"].shape[1] % 128 == 0 and batch["patches"].shape[1] % 128 == 0
    assert xla.prepare(**inputs)[0]["input_ids"].shape[1] < 128
    assert sum("interpret mode" in r.message for r in caplog.records) == 1
    ref = xla.logits(**inputs)
    valid = inputs["attention_mask"].astype(bool)
    err = float(np.abs(out - ref)[valid].max())
    print(f"tiny model logits splash vs xla: max |diff| {err:.2e}")
    assert err <= 1e-4


def _score_shapes(hlo: str, length: int) -> list[str]:
    """Array shapes in an HLO text whose last two dimensions are [length, length] (score matrices)."""
    return re.findall(rf"[fb]f?\d+\[[\d,]*\b{length},{length}\]", hlo)


@pytest.mark.slow  # ~19 s on 2 cores: Mosaic compiles the forward, dq and dkv kernels of text and vision
def test_splash_train_step_compiles_for_tpu_topology():
    """A tiny model's loss + gradient step with attention="auto" on a compile-only v5p:2x2x1 mesh:
    auto is splash there; the compiled program holds Mosaic kernels and no [L, L] score matrix
    (the xla kernel compiled alike has them), for text and for the packed vision rows."""
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices
    mesh = make_mesh(MeshConfig(1, 2, 2), devices=devices)
    cfg = Qwen3VLConfig.from_hf_dict(tiny_hf_config(text_layers=1, vision_depth=1, deepstack=(0,)).to_dict())
    mdef = model_def(cfg)  # attention "auto"
    inputs = build_inputs([[300, ("image", real_image("astronaut", (320, 256)))], [20]], padding_side="left")
    arrays, _ = pack_inputs(cfg, **inputs, buckets=Buckets().for_attention("splash"))
    length, row_len = arrays["input_ids"].shape[1], arrays["patches"].shape[1]
    assert length % 128 == 0 and row_len % 128 == 0 and length != row_len

    def step(params, batch):
        def loss(p):
            return jnp.mean(jnp.square(mdef.hidden(p, batch, dtype=jnp.bfloat16).astype(jnp.float32)))
        return jax.value_and_grad(loss)(params)

    params = jax.tree.map(lambda names, x: jax.ShapeDtypeStruct(x.shape, jnp.float32,
                                                                sharding=named_sharding(names, x.shape, mesh)),
                          mdef.param_axes(), mdef.abstract_params(), is_leaf=lambda x: isinstance(x, tuple))
    batch = {name: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=named_sharding(
        ("batch",) + (None,) * (a.ndim - 1) if name != "positions" else (None, "batch", None), a.shape, mesh))
        for name, a in arrays.items()}
    q = jax.ShapeDtypeStruct((2, 4, length, 16), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, length), jnp.int32)
    with jax.set_mesh(mesh):  # under the suite's "highest" matmul precision (conftest): splash holds its own
        hlo = jax.jit(step).lower(params, batch).compile().as_text()
        xla_hlo = jax.jit(lambda q, s: attend(q, q[:, :2], q[:, :2], s, s, layout=Layout(causal=True),
                                              attention="xla", target=Target("tpu"))).lower(q, seg).compile().as_text()
    assert "tpu_custom_call" in hlo
    assert _score_shapes(xla_hlo, length)  # the pattern finds score matrices where they exist
    assert not _score_shapes(hlo, length) and not _score_shapes(hlo, row_len)


def test_prefill_by_splash_equals_the_full_forward_and_decoding_continues():
    """Decode prefill attends over the prompt's own keys by the config's kernel: with splash
    (interpret; 40-token prompts padded inside to 128) and with xla, its next-token logits and the
    following decode step's (xla against the cache the prefill wrote) equal the xla full forward
    over prompt + token."""
    # two layers: the second layer's cached keys depend on the first layer's (causal) attention
    cfg = Qwen3VLConfig.from_hf_dict(tiny_hf_config(text_layers=2, vision_depth=1, deepstack=(0,)).to_dict())
    inputs = build_inputs([[40], [23]], padding_side="left")
    arrays, info = pack_inputs(cfg, **inputs, pad_to=inputs["input_ids"].shape[1])
    rng = np.random.default_rng(0)  # host random weights: init_params would compile the whole initialiser
    params = jax.tree.map(lambda x: jnp.asarray((1.0 if x.ndim == 1 else 0.0) + 0.1 * rng.standard_normal(x.shape),
                                                jnp.float32), model_def(cfg).abstract_params())
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}
    for kind in ("splash", "xla"):
        mdef = model_def(cfg.replace(attention=kind))

        @jax.jit
        def run(params, batch, mdef=mdef):
            logits, cache = mdef.prefill(params, batch, info["rope_deltas"], batch["input_ids"].shape[1] + 2)
            token = jnp.argmax(logits, -1).astype(jnp.int32)
            return logits, token, mdef.decode_step(params, cache, token)[0]

        first, token, second = run(params, batch)
        seq = with_completions(arrays, info["rope_deltas"], np.asarray(token)[:, None], np.ones((2, 1), bool))
        full = jax.jit(model_def(cfg.replace(attention="xla")).logits)(params, {k: jnp.asarray(v) for k, v in seq.items()})
        assert float(jnp.abs(first - full[:, -2]).max()) <= 1e-4, kind
        assert float(jnp.abs(second - full[:, -1]).max()) <= 1e-4, kind


# ------------------------------------------------------------------ cuDNN
def test_cudnn_gets_btnh_causal_lengths_and_nothing_else(monkeypatch):
    """On a GPU target with a right-padded causal bf16 layout, `attend` hands
    jax.nn.dot_product_attention exactly cuDNN's layout: BTNH arrays, is_causal, per-row query/key
    lengths, no bias, no mask; the same call run by XLA (fp32) equals our xla kernel on the real rows."""
    q, k, v = _qkv(2, 4, 2, 32, 16)
    seg = _text_seg(32, [0, 9], "right")
    seen = {}
    real = jax.nn.dot_product_attention

    def fake(**kw):
        seen.update(kw)
        return real(**dict(kw, implementation="xla"))

    monkeypatch.setattr(attn.jax.nn, "dot_product_attention", fake)
    lengths = jax.jit(lambda q, k, v, s: (attend(q, k, v, s, s, layout=Layout(causal=True, right_padded=True),
                                                 attention="cudnn", target=Target("gpu")),
                                          (seen["query_seq_lengths"], seen["key_value_seq_lengths"]))[1])(
        *(x.astype(jnp.bfloat16) for x in (q, k, v)), seg)
    monkeypatch.undo()
    assert seen["implementation"] == "cudnn" and seen["is_causal"] is True
    assert seen["query"].shape == (2, 32, 4, 16) and seen["key"].shape == (2, 32, 2, 16)
    assert seen["value"].shape == (2, 32, 2, 16) and seen["query"].dtype == jnp.bfloat16
    assert lengths[0].dtype == jnp.int32
    np.testing.assert_array_equal(lengths[0], [32, 23])
    np.testing.assert_array_equal(lengths[1], [32, 23])
    assert "bias" not in seen and "mask" not in seen
    out = jax.jit(lambda *a: attn.cudnn_attention(*a, implementation="xla"))(q, k, v, seg)
    ref = attend_jit(q, k, v, seg, seg, layout=Layout(causal=True), attention="xla", target=CPU)
    valid = np.asarray(seg == 0)
    np.testing.assert_allclose(np.swapaxes(np.asarray(out), 1, 2)[valid], np.swapaxes(np.asarray(ref), 1, 2)[valid],
                               atol=1e-5)


@pytest.mark.parametrize("layout,dtype", [(Layout(causal=True), jnp.bfloat16), (Layout(causal=False), jnp.bfloat16),
                                          (Layout(causal=True, right_padded=True), jnp.float32)],
                         ids=["left_padded", "packed", "fp32"])
def test_cudnn_falls_back_to_xla_for_other_layouts_with_one_log_line(layout, dtype, caplog, monkeypatch):
    q, k, v = (x.astype(dtype) for x in _qkv(1, 2, 2, 16, 8))
    seg = _text_seg(16, [3], "left")

    def refuse(**kw):
        raise AssertionError("cuDNN must not be called for this layout")

    monkeypatch.setattr(attn.jax.nn, "dot_product_attention", refuse)
    attn._warned.clear()
    with caplog.at_level(logging.WARNING, logger="embedrl_jax.models.qwen3_vl.attention"):
        for _ in range(3):  # three traces (every layer, every retrace): one line
            out = jax.jit(lambda *a: attend(*a, layout=layout, attention="cudnn", target=Target("gpu")))(q, k, v, seg, seg)
    lines = [r.message for r in caplog.records if "cuDNN cannot take" in r.message]
    assert len(lines) == 1 and "uses xla" in lines[0]
    ref = attend_jit(q, k, v, seg, seg, layout=layout, attention="xla", target=CPU)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=1e-6)


@pytest.mark.skipif(not any(d.platform == "gpu" for d in jax.devices()),
                    reason="needs a GPU: cuDNN fused attention exists only there (this run has none)")
def test_cudnn_on_gpu_equals_xla():
    gpu = Target("gpu")
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(2, 4, 2, 256, 64))
    seg = _text_seg(256, [0, 40], "right")
    out = attend(q, k, v, seg, seg, layout=Layout(causal=True, right_padded=True), attention="cudnn", target=gpu)
    ref = attend(q, k, v, seg, seg, layout=Layout(causal=True), attention="xla", target=gpu)
    valid = np.asarray(seg == 0)
    diff = np.abs(np.swapaxes(np.asarray(out, np.float32) - np.asarray(ref, np.float32), 1, 2))[valid]
    assert diff.max() <= 2e-2


# ------------------------------------------------------------------ platform choice, buckets, bad input
def test_auto_follows_the_target_platform():
    assert [attn.resolve("auto", Target(p)) for p in ("cpu", "gpu", "tpu")] == ["xla", "cudnn", "splash"]
    assert attn.resolve("xla", Target("tpu")) == "xla"


def test_bucket_rule_rounds_to_the_splash_block_multiple_where_splash_is_used():
    b = Buckets()
    s = b.for_attention("splash")
    assert [b.seq(n) for n in (10, 326, 3000)] == [16, 336, 3072]
    assert [s.seq(n) for n in (10, 326, 3000)] == [128, 384, 3072]
    assert (b.patches(784), s.patches(784)) == (800, 896)
    assert b.for_attention("xla") == b and b.for_attention("cudnn") == b
    assert attn.splash_block(384) == 128 and attn.splash_block(1024) == 512


def test_trainers_and_plans_pack_at_the_splash_multiple_on_tpu():
    """A run's buckets follow its mesh's kernel: a trainer built for a compile-only TPU mesh
    (attention auto = splash) pads to 128 multiples, one forced to xla or on the CPU mesh does not,
    and `embedrl plan` compiles the padded lengths the trainer would pack."""
    from embedrl_jax import plan as plan_lib
    from embedrl_jax.train.core import run_buckets
    from embedrl_jax.train.embedder import EmbedderTrainConfig, EmbedderTrainer

    tpu = make_mesh(MeshConfig(1, 4, 1), devices=topologies.get_topology_desc(
        platform="tpu", topology_name="v5p:2x2x1").devices)
    cpu = make_mesh(MeshConfig(1, -1, 1))
    cfg = TrainerConfig(buckets=Buckets(seq_min=64))
    assert run_buckets(cfg, tpu).multiple == 128 and run_buckets(cfg, tpu).seq(201) == 256
    assert run_buckets(cfg, cpu).multiple == 1 and run_buckets(cfg, cpu).seq(201) == 208
    xla = TrainerConfig(buckets=Buckets(seq_min=64), attention="xla")
    assert run_buckets(xla, tpu).multiple == 1
    ecfg = EmbedderTrainConfig(model="tiny", lora=None, buckets=Buckets(seq_min=64, patch_min=64, rows_min=8),
                               inputs=dataclasses.replace(EmbedderTrainConfig().inputs, max_text_tokens=200,
                                                          image_min_tokens=4, image_max_tokens=16),
                               data=dataclasses.replace(EmbedderTrainConfig().data, toy=False, sub_batch_size=8))
    assert EmbedderTrainer(ecfg, ".", mesh=tpu, abstract=True).buckets.multiple == 128
    budget = plan_lib.text_budget(ecfg.inputs, "inputs", None)
    splash, xla = (plan_lib.embedder_train_program(c, tpu).shapes
                   for c in (ecfg, dataclasses.replace(ecfg, attention="xla")))
    assert splash["padded_tokens"] == ecfg.buckets.for_attention("splash").seq(budget)
    assert xla["padded_tokens"] == ecfg.buckets.seq(budget) and splash["padded_tokens"] % 128 == 0
    assert splash["patch_row_len"] % 128 == 0 and xla["patch_row_len"] % 128 != 0


@pytest.mark.parametrize("kind,platform,match", [
    ("splash", "gpu", "refused on a GPU"), ("cudnn", "cpu", "needs a GPU"), ("cudnn", "tpu", "needs a GPU"),
    ("flash", "tpu", "is not one of"),
])
def test_bad_attention_is_refused_naming_the_field(kind, platform, match):
    with pytest.raises(ConfigError, match=f"attention.*{match}|{match}.*attention"):
        attn.check(kind, platform)
    with pytest.raises(ConfigError, match="attention"):
        attn.resolve(kind, Target(platform))


def test_bad_attention_in_configs_and_load_hf(tiny_dir):
    cfg = Qwen3VLConfig.from_hf_dict(tiny_hf_config().to_dict())
    with pytest.raises(ConfigError, match="attention: 'flash'"):
        cfg.replace(attention="flash")
    with pytest.raises(ConfigError, match="attention: 'fast'"):
        TrainerConfig(attention="fast")
    assert TrainerConfig(attention="splash").attention == "splash"
    with pytest.raises(ConfigError, match="attention='cudnn' needs a GPU"):  # at build time, before any trace
        embedrl_jax.load_hf(tiny_dir, attention="cudnn")


def test_length_over_the_configured_maximum_names_the_row():
    cfg = Qwen3VLConfig.from_hf_dict(tiny_hf_config().to_dict())
    ids = np.full((3, 40), 11, np.int64)
    mask = np.ones((3, 40), np.int64)
    mask[0, :30] = 0
    mask[2, :5] = 0
    with pytest.raises(UserError, match="input row 1 has 40 tokens.*buckets.seq_max=32"):
        pack_inputs(cfg, ids, mask, buckets=Buckets(seq_max=32))
    arrays, _ = pack_inputs(cfg, ids[:, :30], mask[:, :30], buckets=Buckets(seq_max=32))
    assert arrays["input_ids"].shape[1] == 32  # the bucket (32) within the maximum
