"""`embedrl plan`: programs built from shapes alone, compiled for compile-only TPU topologies and
for the CPU mesh; the report's fields, the HLO collective parser, and bad input."""
import json

import jax
import numpy as np
import pytest

from embedrl_jax import plan as plan_lib
from embedrl_jax.cli import main as cli_main

TINY_INPUTS = {"image_min_tokens": 4, "image_max_tokens": 16, "frame_min_tokens": 4, "frame_max_tokens": 8,
               "num_frames": 2, "max_text_tokens": 32}
TINY_EMBEDDER = {"model": "tiny", "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0},
                 "data": {"toy": False, "sub_batch_size": 16}, "inputs": TINY_INPUTS,
                 "buckets": {"seq_min": 64, "patch_min": 64, "rows_min": 8}, "grad_cache_chunks": 1,
                 "compute_dtype": "float32"}
TINY_RL = {"toy": {}, "rollout": {"pairs_per_step": 2, "samples": 2, "max_new_tokens": 8, "max_prompt_tokens": 64},
           "grpo": {"mini_batches": 2}, "inputs": dict(TINY_INPUTS, max_text_tokens=None),
           "embed_inputs": TINY_INPUTS, "buckets": {"seq_min": 64, "patch_min": 64, "rows_min": 8},
           "embed_batch_size": 8, "judge_batch_size": 8, "compute_dtype": "float32"}


def _write(tmp_path, name, cfg):
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return str(path)


def _check_report_fields(rep):
    b = rep["bytes_per_chip"]
    assert rep["error"] is None
    assert b["arguments"] > 0 and b["temporaries"] > 0 and b["outputs"] > 0
    assert b["total"] == b["arguments"] + b["outputs"] + b["temporaries"] - b["aliased"]
    assert rep["fits"] == (b["total"] <= rep["hbm_bytes_per_chip"])
    assert rep["tokens_per_step"] > 0 and rep["analytic_flops_per_chip"] > 0 and rep["flops_per_chip"] > 0


# ------------------------------------------------------------------ topology names and parsing
@pytest.mark.parametrize("name,expect", [
    ("v5p:2x4x4", "v5p:2x4x4"), ("v5p-64", "v5p:2x4x4"), ("v5p-128", "v5p:4x4x4"), ("v5p-256", "v5p:4x4x8"),
    ("v5e-64", "v5e:8x8"), ("v5litepod-256", "v5e:16x16"), ("v6e-16", "v6e:4x4"), ("v4-16", "v4:2x2x2"),
    ("v5p-8", "v5p:2x2x1"),
])
def test_topology_names(name, expect):
    assert plan_lib.parse_topology(name) == ("tpu", expect, None)


def test_unknown_topology_lists_accepted_forms():
    with pytest.raises(ValueError, match="accepted forms: .*v5p:2x4x4.*cpu:N"):
        plan_lib.parse_topology("v9x-8")
    with pytest.raises(ValueError, match="powers of two"):
        plan_lib.parse_topology("v5e-48")


def test_compile_only_topology_reports_chips_and_hosts():
    t = plan_lib.resolve_target("v5p-64")
    assert (t.chips, t.hosts, t.platform) == (32, 8, "tpu")
    two = plan_lib.resolve_target("v5p:2x2x1", slices=2)
    assert (two.chips, two.slices) == (8, 2)
    mesh = plan_lib.build_mesh(plan_lib.parse_mesh("1,4,1"), two)  # one slice's mesh; slices stack along data
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    # the data axis runs across the slices: each data row is one slice
    slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (slice_of[0] == slice_of[0].flat[0]).all() and (slice_of[1] != slice_of[0].flat[0]).all()


def test_packed_batch_matches_pack_inputs():
    """The abstract batch has the keys, dtypes and ranks `pack_inputs` produces."""
    from embedrl_jax.models.qwen3_vl.inputs import pack_inputs

    mcfg = plan_lib.model_shape_config("tiny", "model")
    real, _ = pack_inputs(mcfg, np.ones((2, 8), np.int32), pad_to=16, vision=(2, 64))
    target = plan_lib.resolve_target("cpu:8")
    mesh = plan_lib.build_mesh(plan_lib.parse_mesh("1,-1,1"), target)
    abstract = plan_lib.packed_batch(mcfg, mesh, 2, 16, (2, 64))
    assert set(abstract) == set(real)
    for k, v in real.items():
        assert (abstract[k].shape, abstract[k].dtype) == (v.shape, v.dtype), k


def test_collectives_parser_counts_kinds_bytes_and_loops():
    hlo = """HloModule m

%body.1 (p: (s32[], bf16[8,128])) -> (s32[], bf16[8,128]) {
  %ag = bf16[8,128]{1,0} all-gather(bf16[1,128]{1,0} %x), dimensions={0}
  %rs-start = ((f32[64]{0}), f32[8]{0}, u32[]{:S(2)}) reduce-scatter-start(f32[64]{0} %y)
  %rs-done = f32[8]{0} reduce-scatter-done(%rs-start)
}

%cond.1 (p: (s32[], bf16[8,128])) -> pred[] {
}

ENTRY %main (a: f32[4], /*index=1*/b: f32[4]) -> f32[4] {
  %ar = f32[4]{0} all-reduce(f32[4]{0} %a), to_apply=%add
  %cp-start = (f32[16]{0}, f32[16]{0}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%a)
  %w = (s32[], bf16[8,128]) while(%t), condition=%cond.1, body=%body.1
}
"""
    c = plan_lib.collectives(hlo)
    assert c["all-gather"] == {"count": 1, "bytes": 8 * 128 * 2, "in_loop_count": 1, "in_loop_bytes": 8 * 128 * 2}
    assert c["reduce-scatter"]["bytes"] == 8 * 4 and c["reduce-scatter"]["in_loop_count"] == 1
    assert c["all-reduce"] == {"count": 1, "bytes": 16, "in_loop_count": 0, "in_loop_bytes": 0}
    assert c["collective-permute"]["bytes"] == 64 and "all-to-all" not in c


# ------------------------------------------------------------------ bad input
def test_bad_input_is_named(tmp_path):
    cfg = _write(tmp_path, "tiny.json", TINY_EMBEDDER)
    with pytest.raises(ValueError, match=r"mesh .* needs 3 devices, have 8"):
        plan_lib.plan(cfg, "cpu:8", mesh="3,1,1")
    with pytest.raises(ValueError, match="config key model='no/such-model'"):
        plan_lib.plan(cfg, "cpu:8", overrides=["model=no/such-model"])
    with pytest.raises(ValueError, match="inputs.max_text_tokens"):
        plan_lib.plan(cfg, "cpu:8", overrides=["inputs.max_text_tokens=null"])
    with pytest.raises(ValueError, match="cpu:64 needs 64 host devices"):
        plan_lib.plan(cfg, "cpu:64")
    with pytest.raises(ValueError, match="unknown config key 'no_such'"):
        plan_lib.plan(cfg, "cpu:8", overrides=["no_such=1"])


def test_cli_bad_topology_exits_2(tmp_path, capsys):
    cfg = _write(tmp_path, "tiny.json", TINY_EMBEDDER)
    assert cli_main(["plan", "--config", cfg, "--topology", "v5q-32"]) == 2
    assert "accepted forms" in capsys.readouterr().err


def test_programs_flag_selects_and_names_unknown(tmp_path):
    """`--programs` compiles a named subset of a run's programs, in the run's order; a name that is
    not one of them is refused with the run's program names."""
    from embedrl_jax.config import PRESET_DIR

    kind, cfg = plan_lib.load_run_config(str(PRESET_DIR / "egrl_8b.json"))
    assert list(plan_lib.select_programs(kind, cfg)) == ["rollout", "reward_embed", "grpo_update", "judge"]
    assert list(plan_lib.select_programs(kind, cfg, ["judge", "grpo_update"])) == ["grpo_update", "judge"]
    with pytest.raises(ValueError, match=r"--programs: embedder_train_step not a program .*rollout, reward_embed"):
        plan_lib.select_programs(kind, cfg, ["embedder_train_step"])
    bad = ["plan", "--config", str(PRESET_DIR / "egrl_8b.json"), "--topology", "cpu:8", "--programs", "rollout,nope"]
    assert cli_main(bad) == 2


# ------------------------------------------------------------------ compiles
@pytest.mark.slow
def test_plan_cpu8_agrees_with_the_cpu_mesh(tmp_path, capsys):
    """`plan` on cpu:8 (JSON contract via the CLI), then the same program run for real on the
    CPU mesh: the arguments and outputs it allocates per device are what the plan reported."""
    cfg = _write(tmp_path, "tiny.json", TINY_EMBEDDER)
    assert cli_main(["plan", "--config", cfg, "--topology", "cpu:8", "--mesh", "2,2,2", "--json", "attention=xla"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["overrides"] == ["attention=xla"]  # a saved report says how it was made
    assert {"topology", "chips", "hosts", "programs"} <= set(rep) and (rep["chips"], rep["hosts"]) == (8, 1)
    (p,) = rep["programs"]
    assert {"name", "fits", "bytes_per_chip", "hbm_bytes_per_chip", "tokens_per_step", "flops_per_chip",
            "analytic_flops_per_chip", "collectives", "error"} <= set(p)
    _check_report_fields(p)
    assert p["collectives"], "a (2,2,2) mesh step has collectives"

    kind, c = plan_lib.load_run_config(cfg)
    target = plan_lib.resolve_target("cpu:8")
    mesh = plan_lib.build_mesh(plan_lib.parse_mesh("2,2,2"), target)
    prog = plan_lib.embedder_train_program(c, mesh)
    dev0 = target.devices[0]

    def zeros(s):
        if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key):
            return jax.device_put(jax.random.key(0), s.sharding)
        return jax.device_put(np.zeros(s.shape, s.dtype), s.sharding)

    def on_dev0(tree):
        return sum(sh.data.nbytes for x in jax.tree.leaves(tree) for sh in x.addressable_shards if sh.device == dev0)

    args = jax.tree.map(zeros, prog.args)
    arg_bytes = on_dev0(args)
    with jax.set_mesh(mesh):
        out = prog.fn(*args)
    jax.block_until_ready(out)
    assert abs(arg_bytes - p["bytes_per_chip"]["arguments"]) <= 0.05 * arg_bytes
    out_bytes = on_dev0(out)
    assert abs(out_bytes - p["bytes_per_chip"]["outputs"]) <= 0.05 * out_bytes + 1024
    assert np.isfinite(float(out[1]["loss"]))


@pytest.mark.slow
def test_tiny_train_step_compiles_for_tpu(tmp_path):
    """The tiny Embedder train step, compiled for 4 compile-only v5p chips with FSDP: memory,
    FLOPs and collectives (all-gathers of the FSDP-sharded weights) are reported."""
    cfg = _write(tmp_path, "tiny.json", TINY_EMBEDDER)
    rep = plan_lib.plan(cfg, "v5p:2x2x1")
    assert (rep["chips"], rep["hosts"], rep["platform"]) == (4, 1, "tpu")
    (p,) = rep["programs"]
    _check_report_fields(p)
    assert p["fits"] and p["hbm_bytes_per_chip"] == 95 * 2**30
    assert p["collectives"]["all-gather"]["count"] > 0 and p["collectives"]["all-gather"]["bytes"] > 0
    assert p["estimated_step_s"] > 0 and 0 < p["estimated_mfu"] <= 1


@pytest.mark.slow
def test_tiny_decode_loop_compiles_for_tpu(tmp_path):
    """The EG-RL rollout (prefill + KV-cache decode loop) of a tiny config compiles for TPU; the
    decode loop shows in the HLO as a while loop, with collectives inside it on an FSDP mesh."""
    from embedrl_jax.train.reasoner import ReasonerRLConfig

    from embedrl_jax.config import from_dict

    cfg = from_dict(ReasonerRLConfig, TINY_RL)
    target = plan_lib.resolve_target("v5p:2x2x1")
    mesh = plan_lib.build_mesh(plan_lib.parse_mesh("1,-1,1"), target)
    prog = plan_lib.rollout_program(cfg, mesh)
    rep = plan_lib.compile_program(prog, target, mesh)
    _check_report_fields(rep)
    assert rep["shapes"]["sequences"] == 2 * 2 * 2 and rep["shapes"]["new_tokens"] == 8
    assert rep["hlo_has_while_loop"]
    assert sum(c["in_loop_count"] for c in rep["collectives"].values()) > 0


def test_failed_compile_is_reported_not_raised(tmp_path):
    cfg = _write(tmp_path, "tiny.json", TINY_EMBEDDER)
    kind, c = plan_lib.load_run_config(cfg)
    target = plan_lib.resolve_target("cpu:8")
    mesh = plan_lib.build_mesh(plan_lib.parse_mesh("1,-1,1"), target)
    prog = plan_lib.embedder_train_program(c, mesh)
    bad = plan_lib.Program(prog.name, prog.fn, prog.args[:2], prog.shapes, 1, 1.0)  # missing arguments
    rep = plan_lib.compile_program(bad, target, mesh)
    assert rep["error"] and not rep["fits"] and rep["bytes_per_chip"] is None


# ------------------------------------------------------------------ the paper's configs
def test_paper_configs_shape_every_program_from_presets():
    """The shipped configs load, name their kind, and every program's abstract shapes carry the
    method's settings (built from the presets alone: no weights, no data, no compile)."""
    from embedrl_jax.config import PRESET_DIR

    target = plan_lib.resolve_target("v5p:4x4x4")
    mesh = plan_lib.build_mesh(plan_lib.parse_mesh("1,-1,1"), target)
    kinds = {}
    for name in ("embedder_2b", "embedder_4b", "sft_reasoner_8b", "egrl_8b"):
        kind, cfg = plan_lib.load_run_config(str(PRESET_DIR / f"{name}.json"))
        kinds[name] = kind
        progs = {p.name: p for p in (build(cfg, mesh) for build in plan_lib.programs_for(kind, cfg).values())}
        if name.startswith("embedder"):
            p = progs["embedder_train_step"]
            assert p.shapes["pairs"] == (1024 if name == "embedder_2b" else 512)
            assert cfg.lora.rank == (64 if name == "embedder_2b" else 96) and cfg.lora.alpha == 2 * cfg.lora.rank
            assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_steps) == (1e-4, "cosine", 10)
            state = p.args[0]
            assert all(x.dtype == np.float32 for x in jax.tree.leaves(state["params"]))
        elif name == "egrl_8b":
            assert set(progs) == {"rollout", "reward_embed", "grpo_update", "judge"}
            r = progs["rollout"].shapes
            assert (r["sequences"], r["prompt_tokens"], r["new_tokens"]) == (256, 14336, 2048)
            g = progs["grpo_update"].shapes
            assert (g["rollouts"], g["mini_batches"], g["completion_tokens"]) == (256, 2, 2048)
            assert (cfg.optim.lr, cfg.grpo.kl_coef, cfg.grpo.dual_clip, cfg.grpo.aggregation) == (3e-6, 0.01, 3.0, "token-mean")
        for p in progs.values():
            assert p.tokens_per_step > 0 and p.analytic_flops > 0
    assert kinds == {"embedder_2b": "embedder", "embedder_4b": "embedder", "sft_reasoner_8b": "sft", "egrl_8b": "egrl"}


def test_hbm_refusal_is_read_from_the_compiler_message():
    msg = ("JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
           "temporaries (129.15G) exceeds available HBM (95.74G).")
    got = plan_lib.oom_bytes(msg)
    assert got == {"what": "temporaries", "required": int(129.15 * 2**30), "available": int(95.74 * 2**30)}
    assert plan_lib.oom_bytes("INTERNAL: something else") is None


def test_unsplittable_batch_is_named_in_the_advice():
    from embedrl_jax.config import from_dict
    from embedrl_jax.train.reasoner import ReasonerRLConfig

    target = plan_lib.resolve_target("cpu:8")
    mesh = plan_lib.build_mesh(plan_lib.parse_mesh("1,-1,1"), target)
    bad = plan_lib.reward_embed_program(from_dict(ReasonerRLConfig, dict(TINY_RL, embed_batch_size=6)), mesh)
    assert "its 6 rows do not divide the 8 batch devices" in plan_lib._help(bad, "temporaries", mesh)
    good = plan_lib.reward_embed_program(from_dict(ReasonerRLConfig, TINY_RL), mesh)
    assert "do not divide" not in plan_lib._help(good, "temporaries", mesh)


@pytest.mark.slow
def test_tpu_target_takes_the_scan_path_without_patching(tmp_path):
    """The model follows the mesh's platform (models.platform): the same trainer program lowered
    for compile-only TPU chips rolls its layers into scans (while loops: forward and backward);
    for the CPU mesh the layers are unrolled (fewer loops, a longer program). Nothing is patched."""
    # one attention kernel on both (splash on TPU would drop the xla kernel's row loops from the count)
    cfg = _write(tmp_path, "tiny.json", dict(TINY_EMBEDDER, attention="xla"))
    _, c = plan_lib.load_run_config(cfg)
    loops = {}
    for topo in ("v5p:2x2x1", "cpu:4"):
        target = plan_lib.resolve_target(topo)
        mesh = plan_lib.build_mesh(plan_lib.parse_mesh("1,-1,1"), target)
        prog = plan_lib.embedder_train_program(c, mesh)
        with jax.set_mesh(mesh):
            text = prog.fn.lower(*prog.args).as_text()
        loops[target.platform] = (text.count("stablehlo.while"), len(text))
    assert loops["tpu"][0] > loops["cpu"][0], loops
    assert loops["tpu"][1] < loops["cpu"][1], loops
