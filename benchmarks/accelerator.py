"""Accelerator figures: the 2B Embedder's train step (pairs/s, MFU against the chip's peak) and
the 8B Reasoner's KV-cache decode (tokens/s against the HBM bound), on whatever devices jax sees.

    python benchmarks/accelerator.py                      # the paper presets, every local device
    python benchmarks/accelerator.py --layers 8           # cut both decoders to 8 layers when memory is short
    python benchmarks/accelerator.py --preset tiny        # toy models: a CPU smoke run of the whole script
    python benchmarks/accelerator.py --seqs-per-chip 2 --tokens 4096 --cache-len 16384 --decode-seqs-per-chip 16

Why this shape: `embedrl plan` says what fits and estimates a roofline from compile-only devices;
this measures the same programs on a real chip. The train step is the one `embedrl plan` compiles
(`plan.embedder_train_program`: the trainer's own jitted, donated update with the configured
LoRA, GradCache chunks, remat and dtypes) and its analytic FLOPs are plan's, so a planned MFU
and a measured one count alike. Weights are random, created in their shards by one jitted
function with the program's own shardings (no host ever holds the model); the batch is
synthetic (one image at the config's image budget per item, random text to the padded length,
<emb> last), packed by the model's packer to exactly the shapes plan compiles.

Decode runs `ModelDef.decoder(...).step` (the sampler's step) in a `fori_loop` of
`--decode-steps` greedy tokens against a full cache of `--cache-len` slots, so each step reads
every weight once and the whole cache: its HBM bound is (decoder + LM-head weights a chip reads
after the FSDP gather + its share of the cache) / HBM bandwidth.

Peaks and bandwidths come from `embedrl_jax.chips` (shared with `embedrl plan`); an unknown
device kind (a CPU, another GPU) prints no MFU and says so. Nothing here is a test; its figures
go to the README with the machine they were measured on.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from embedrl_jax import plan as plan_lib
from embedrl_jax.chips import chip_of
from embedrl_jax.config import PRESET_DIR
from embedrl_jax.errors import UserError
from embedrl_jax.hf import param_shardings
from embedrl_jax.models.platform import frozen_dtype, platform_of
from embedrl_jax.models.qwen3_vl.config import Qwen3VLConfig
from embedrl_jax.models.qwen3_vl.inputs import Buckets, pack_chunks
from embedrl_jax.models.qwen3_vl.model import model_def
from embedrl_jax.sharding import MeshConfig, make_mesh, named_sharding
from embedrl_jax.toy.base import tiny_hf_config

# (Embedder train config, Reasoner RL config, per-preset defaults of the decode shape)
PRESETS = {
    "paper": ("configs/embedder_2b.json", "configs/egrl_8b.json", {"cache_len": 4096, "decode_seqs_per_chip": 8}),
    "tiny": ("configs/toy_embedder.json", "configs/toy_reasoner_rl.json", {"cache_len": 256, "decode_seqs_per_chip": 1}),
}
PACKAGES = ("jax", "jaxlib", "libtpu", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt",
            "flax")


# ------------------------------------------------------------------ device and versions
def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def describe(mesh) -> tuple[str, object]:
    """(one line on the mesh's devices, their chip row or None)."""
    d = mesh.devices.flat[0]
    chip = chip_of(d)
    peak = (f"peak {chip.peak_flops / 1e12:.0f} TFLOP/s bf16, HBM {chip.hbm_bandwidth / 1e12:.2f} TB/s, "
            f"{chip.hbm_bytes / 2**30:.0f} GiB per chip ({chip.kind})") if chip else \
        f"no peak known for {d.platform} (device kind {d.device_kind!r})"
    line = (f"devices: {mesh.devices.size} x {d.device_kind!r} (platform {platform_of(mesh)}), "
            f"{jax.process_count()} process(es), mesh {dict(mesh.shape)}; {peak}")
    return line, chip


def peak_memory(mesh) -> str:
    """Peak bytes in use on the first device so far, where the runtime reports it (not XLA:CPU)."""
    stats = getattr(mesh.devices.flat[0], "memory_stats", lambda: None)()
    if not stats or "peak_bytes_in_use" not in stats:
        return "peak device memory: not reported on this platform"
    limit = stats.get("bytes_limit")
    return (f"peak device memory: {stats['peak_bytes_in_use'] / 2**30:.2f} GiB"
            + (f" of {limit / 2**30:.2f} GiB" if limit else ""))


def si(x: float, unit: str) -> str:
    """A rate with its SI prefix (TFLOP/s on a chip, GFLOP/s on a CPU smoke run)."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:.3f} {prefix}{unit}"
    return f"{x:.3f} {unit}"


# ------------------------------------------------------------------ model sources
def hf_dict(value: str, key: str) -> dict:
    """The HF config.json dict of a model key ("tiny", a directory, or a preset)."""
    if value == "tiny":
        return tiny_hf_config(vocab=1024).to_dict()
    path = Path(value).expanduser()
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    return json.loads((PRESET_DIR / "models" / f"{plan_lib.model_source(value, key)}.json").read_text())


def cut_layers(d: dict, layers: int) -> dict:
    """The same architecture with `layers` text decoder layers (DeepStack feeds at most that many)."""
    d = json.loads(json.dumps(d))
    d["text_config"]["num_hidden_layers"] = layers
    v = d["vision_config"]
    v["deepstack_visual_indexes"] = list(v.get("deepstack_visual_indexes", (8, 16, 24)))[:layers]
    return d


def model_dir(d: dict, tmp: str, name: str) -> str:
    path = Path(tmp) / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(d))
    return str(path)


# ------------------------------------------------------------------ random state in its shards
def hash_noise(shape, dtype, salt: int):
    """Uniform values of std 0.02 from a multiplicative hash of the element index.

    Why not jax.random: threefry for each of a model's leaves took XLA:CPU ~1 s per leaf to
    compile (39 s for the toy model on this host, against 4 s for this); timing needs weights
    of the right scale, not statistical quality. Computed from an iota, so each shard makes its
    own part."""
    idx = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    h = idx * jnp.uint32(2654435761) + jnp.uint32((salt * 2654435761 + 1) % 2**32)
    h = (h ^ (h >> 15)) * jnp.uint32(2246822519)
    u = (h ^ (h >> 13)).astype(jnp.float32) / 2.0**32
    return (0.02 * math.sqrt(12.0) * (u - 0.5)).astype(dtype)


def random_like(tree, seed: int = 0):
    """Arrays of a tree of ShapeDtypeStructs, made by one jitted function on their own shardings
    (no host ever holds the model).

    Values as transformers initialises weights (norm scales 1, biases 0, the rest ~0.02 noise):
    finite losses and gradients, so the step's non-finite guard never skips an update.
    Optimizer moments and counters start at zero, as `init_state` makes them."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)

    def one(i, path, x):
        name = jax.tree_util.keystr(path)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key(seed) if x.shape == () else jax.random.split(jax.random.key(seed), x.shape)
        if not jnp.issubdtype(x.dtype, jnp.floating) or "opt_state" in name:
            return jnp.zeros(x.shape, x.dtype)
        leaf = name.rstrip("']").lower()
        if leaf.endswith(("scale", "norm")):
            return jnp.ones(x.shape, x.dtype)
        if leaf.endswith("bias"):
            return jnp.zeros(x.shape, x.dtype)
        return hash_noise(x.shape, x.dtype, seed * 100003 + i)

    def make():
        return jax.tree_util.tree_unflatten(treedef, [one(i, p, x) for i, (p, x) in enumerate(flat)])

    shardings = jax.tree_util.tree_unflatten(treedef, [x.sharding for _, x in flat])
    return jax.jit(make, out_shardings=shardings)()


def place(arrays: dict[str, np.ndarray], like: dict) -> dict:
    """Global host arrays onto the shardings of `like` (every process builds the same arrays)."""
    return {k: jax.make_array_from_callback(a.shape, like[k].sharding, lambda idx, a=a: a[idx])
            for k, a in arrays.items()}


def image_grid(tokens: int, merge: int) -> tuple[int, int]:
    """(h, w) patches of an image of `tokens` merged tokens, as square as its divisors allow."""
    a = max(i for i in range(1, int(math.isqrt(tokens)) + 1) if tokens % i == 0)
    return merge * a, merge * (tokens // a)


def synthetic_side(mcfg: Qwen3VLConfig, like: dict, image_tokens: int, token_id: int, seed: int) -> dict:
    """One tower's [C, b, ...] packed chunks at exactly the abstract shapes `like`: each item one
    image of `image_tokens` merged tokens, random text to the padded length, <emb> last."""
    chunks, rows, seq = like["input_ids"].shape
    merge, v = mcfg.vision.spatial_merge_size, mcfg.vision
    h, w = image_grid(image_tokens, merge)
    specials = {mcfg.image_token_id, mcfg.video_token_id, mcfg.vision_start_token_id, mcfg.vision_end_token_id, token_id}
    rng = np.random.default_rng(seed)
    head = [mcfg.vision_start_token_id] + [mcfg.image_token_id] * image_tokens + [mcfg.vision_end_token_id]
    # one random image repeated: pixel values do not change the cost, and a paper-sized batch of
    # distinct ones took longer to draw on the host than the step takes
    image = rng.standard_normal((h * w, v.patch_dim)).astype(np.float32)
    batches = []
    for _ in range(chunks):
        text = rng.integers(0, mcfg.text.vocab_size, size=(rows, seq - len(head) - 1))
        text[np.isin(text, list(specials))] = 0
        ids = np.concatenate([np.tile(head, (rows, 1)), text, np.full((rows, 1), token_id)], axis=1).astype(np.int32)
        batches.append(dict(input_ids=ids, attention_mask=np.ones_like(ids),
                            mm_token_type_ids=(ids == mcfg.image_token_id).astype(np.int32),
                            pixel_values=np.tile(image, (rows, 1)),
                            image_grid_thw=np.array([[1, h, w]] * rows, np.int64)))
    vision = tuple(like["patches"].shape[1:3])  # [C, rows, row_len, patch_dim]
    packed = pack_chunks(mcfg, batches, Buckets(exact=True), shape=(seq, vision))
    wrong = {k: (a.shape, like[k].shape) for k, a in packed.items() if a.shape != like[k].shape}
    if wrong or packed.keys() != like.keys():
        raise RuntimeError(f"synthetic batch does not match the program's arguments (ours, program's): {wrong}, "
                           f"keys {sorted(packed)} vs {sorted(like)}")
    return place(packed, like)


# ------------------------------------------------------------------ the train step
def bench_train(args, mesh, chip, tmp: str) -> None:
    path = args.embedder_config or PRESETS[args.preset][0]
    kind, cfg = plan_lib.load_run_config(path, args.set)
    if kind != "embedder":
        raise SystemExit(f"--embedder-config {path}: a {kind} config, not a train-embedder one")
    chunks = args.chunks or cfg.grad_cache_chunks
    pairs = args.seqs_per_chip * plan_lib.batch_devices(mesh) * chunks
    model = hf_dict(cfg.model, "model")
    if args.layers:
        model = cut_layers(model, args.layers)
    mcfg = Qwen3VLConfig.from_hf_dict(model)
    cfg = dataclasses.replace(cfg, model=model_dir(model, tmp, "embedder"), grad_cache_chunks=chunks,
                              data=dataclasses.replace(cfg.data, sub_batch_size=pairs, sub_batches_per_batch=1))
    image_tokens = cfg.inputs.image_max_tokens
    if args.tokens is not None and args.tokens < image_tokens + 3:
        raise SystemExit(f"--tokens {args.tokens}: each item holds one image of {image_tokens} tokens "
                         f"(inputs.image_max_tokens) + 3; give at least {image_tokens + 3}")
    prog = plan_lib.embedder_train_program(cfg, mesh, args.tokens)
    state, frozen, q_like, p_like, key_like = prog.args
    token_id = int((mcfg.emb_token_ids or (mcfg.text.vocab_size - 1,))[0])  # as the abstract trainer picks it
    t0 = time.perf_counter()
    state, frozen, key = random_like((state, frozen, key_like), seed=cfg.seed)
    q = synthetic_side(mcfg, q_like, image_tokens, token_id, seed=1)
    p = synthetic_side(mcfg, p_like, image_tokens, token_id, seed=2)
    jax.block_until_ready((state, frozen, q, p))
    init_s = time.perf_counter() - t0
    s = prog.shapes
    lora = f"LoRA rank {cfg.lora.rank}" if cfg.lora else "full fine-tuning"
    print(f"\n== Embedder train step: {Path(path).name}, {mcfg.text.num_hidden_layers} text layers, {lora}, "
          f"compute {cfg.compute_dtype}, base {cfg.base_dtype}, remat {cfg.remat}")
    print(f"batch: {s['pairs']} pairs = {s['sequences']} sequences of {s['padded_tokens']} tokens (one "
          f"{image_tokens}-token image each), {chunks} GradCache chunk(s) of {s['pairs_per_chunk']} pairs = "
          f"{args.seqs_per_chip} sequences per chip per tower forward; random weights made in their shards in "
          f"{init_s:.1f}s")
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        lowered = prog.fn.lower(state, frozen, q, p, key)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        mem = compiled.memory_analysis()
        per_chip = "" if mem is None else (
            f"; per chip: arguments {mem.argument_size_in_bytes / 2**30:.2f} GiB, temporaries "
            f"{mem.temp_size_in_bytes / 2**30:.2f} GiB, outputs {mem.output_size_in_bytes / 2**30:.2f} GiB")
        print(f"traced and lowered in {t1 - t0:.1f}s, compiled in {t2 - t1:.1f}s{per_chip}")
        for _ in range(args.warmup):
            state, metrics = compiled(state, frozen, q, p, key)
        jax.block_until_ready((state, metrics))
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = compiled(state, frozen, q, p, key)
        jax.block_until_ready((state, metrics))
        step_s = (time.perf_counter() - t0) / args.steps
    metrics = jax.device_get(metrics)
    n = mesh.devices.size
    executed = prog.analytic_flops / step_s
    print(f"step: {step_s:.4f} s over {args.steps} steps after {args.warmup} warm-up; loss {float(metrics['loss']):.4f}, "
          f"skipped steps {int(jax.device_get(state['skipped']))}")
    print(f"pairs/s: {s['pairs'] / step_s:.2f} ({s['pairs'] / step_s / n:.2f} per chip); tokens/s: "
          f"{prog.tokens_per_step / step_s:.0f}")
    print(f"achieved FLOP/s (analytic, executed incl. recompute): {si(executed, 'FLOP/s')}, "
          f"{si(executed / n, 'FLOP/s')} per chip; model FLOPs per step {prog.model_flops:.3g}")
    if chip:
        print(f"MFU: {100 * prog.model_flops / step_s / (n * chip.peak_flops):.1f}% of {chip.kind}'s "
              f"{chip.peak_flops / 1e12:.0f} TFLOP/s bf16 peak (HFU incl. recompute "
              f"{100 * executed / (n * chip.peak_flops):.1f}%)")
    else:
        d = mesh.devices.flat[0]
        print(f"MFU: no peak known for {d.platform} (device kind {d.device_kind!r})")
    print(peak_memory(mesh))


# ------------------------------------------------------------------ decode
def decode_program(mdef, dtype, steps: int, start: int, out_shardings):
    """jit(params, cache, tokens) -> (cache, tokens): `steps` greedy decode steps written at slots
    start .. start + steps - 1 of a full cache (every slot valid), so every call reads the same
    cache length; the cache is donated and comes back on the shardings it went in with
    (`out_shardings`), so one compiled program serves every call."""
    def run(params, cache, tokens):
        dec = mdef.decoder(params, dtype=dtype)  # outside the loop: one weight split on XLA:CPU
        cache = dict(cache, slot=jnp.int32(start))

        def body(_, carry):
            c, tok = carry
            logits, c = dec.step(c, tok)
            return c, jnp.argmax(logits, -1).astype(jnp.int32)

        return jax.lax.fori_loop(0, steps, body, (cache, tokens))

    return jax.jit(run, donate_argnums=(1,), out_shardings=out_shardings)


def full_cache(mdef, params, dtype, rows: int, length: int, start: int):
    """A decode cache of `length` slots per row, all valid, on the mesh in the sharding context."""
    def make(params):
        c = mdef.decoder(params, dtype=dtype).init_cache(rows, length)
        return dict(c, valid=jnp.ones_like(c["valid"]), slot=jnp.int32(start), pos=jnp.full((rows,), start, jnp.int32))

    return jax.jit(make)(params)


def bench_decode(args, mesh, chip) -> None:
    path = args.reasoner_config or PRESETS[args.preset][1]
    kind, cfg = plan_lib.load_run_config(path)
    if kind != "egrl":
        raise SystemExit(f"--reasoner-config {path}: a {kind} config, not a train-reasoner one")
    model = hf_dict("tiny" if cfg.toy is not None else cfg.policy, "policy")
    if args.layers:
        model = cut_layers(model, args.layers)
    mcfg = Qwen3VLConfig.from_hf_dict(model)
    mdef = model_def(mcfg)
    defaults = PRESETS[args.preset][2]
    length = args.cache_len or defaults["cache_len"]
    per_chip = args.decode_seqs_per_chip or defaults["decode_seqs_per_chip"]
    rows = per_chip * plan_lib.batch_devices(mesh)
    steps = args.decode_steps
    if steps >= length:
        raise SystemExit(f"--decode-steps {steps} must be below --cache-len {length} (the steps write into the cache)")
    start = length - steps
    # frozen policy weights: "auto" is the target's choice (bf16 on TPU/GPU), as the trainers resolve it
    wdtype, cdtype = jnp.dtype(frozen_dtype(cfg.base_dtype, mesh)), jnp.dtype(cfg.compute_dtype)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, wdtype, sharding=s),
                            mdef.abstract_params(), param_shardings(mdef, mesh))
    t0 = time.perf_counter()
    params = random_like(abstract, seed=cfg.seed)
    tokens = jax.make_array_from_callback((rows,), named_sharding(("batch",), (rows,), mesh),
                                          lambda idx: np.arange(rows, dtype=np.int32)[idx] % mcfg.text.vocab_size)
    with jax.set_mesh(mesh):
        cache = full_cache(mdef, params, cdtype, rows, length, start)
        jax.block_until_ready((params, cache))
        init_s = time.perf_counter() - t0
        fn = decode_program(mdef, cdtype, steps, start, jax.tree.map(lambda x: x.sharding, (cache, tokens)))
        t0 = time.perf_counter()
        lowered = fn.lower(params, cache, tokens)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        lower_s, compile_s = t1 - t0, time.perf_counter() - t1
        for _ in range(args.warmup):
            cache, tokens = compiled(params, cache, tokens)
        jax.block_until_ready((cache, tokens))
        t0 = time.perf_counter()
        for _ in range(args.decode_repeats):
            cache, tokens = compiled(params, cache, tokens)
        jax.block_until_ready((cache, tokens))
        call_s = (time.perf_counter() - t0) / args.decode_repeats
    t = mcfg.text
    dec, _, head = plan_lib.matmul_params(mcfg)
    weight_bytes = (dec + head) * wdtype.itemsize
    cache_bytes = 2 * t.num_hidden_layers * rows * t.num_key_value_heads * length * t.head_dim * cdtype.itemsize
    n, tensor = mesh.devices.size, mesh.shape["tensor"]
    chip_bytes = weight_bytes / tensor + cache_bytes / n  # FSDP gathers every weight onto each chip of a tensor group
    step_s = call_s / steps
    tok_s = rows / step_s
    flops = 2.0 * (dec + head) * rows + 4.0 * t.num_hidden_layers * rows * t.num_attention_heads * t.head_dim * length
    print(f"\n== Reasoner decode: {Path(path).name} policy, {t.num_hidden_layers} text layers, weights {wdtype.name}, "
          f"compute and KV cache {cdtype.name}")
    print(f"shape: {rows} sequences ({per_chip} per chip) against a {length}-slot cache, {steps} greedy tokens per "
          f"call; weights {weight_bytes / 2**30:.2f} GiB read per step, KV cache {cache_bytes / 2**30:.2f} GiB; "
          f"random weights made in their shards in {init_s:.1f}s; traced and lowered in {lower_s:.1f}s, "
          f"compiled in {compile_s:.1f}s")
    print(f"decode: {step_s * 1e3:.2f} ms/step, tokens/s: {tok_s:.1f} ({tok_s / n:.1f} per chip); "
          f"achieved {si(flops / step_s / n, 'FLOP/s')} per chip")
    if chip:
        bound = rows / (chip_bytes / chip.hbm_bandwidth)
        print(f"HBM bound: {bound:.1f} tokens/s ({chip_bytes / 2**30:.2f} GiB per chip per step at "
              f"{chip.hbm_bandwidth / 1e12:.2f} TB/s); measured {100 * tok_s / bound:.1f}% of it; achieved "
              f"{si(chip_bytes / step_s, 'B/s')} per chip")
    else:
        d = mesh.devices.flat[0]
        print(f"HBM bound: no bandwidth known for {d.platform} (device kind {d.device_kind!r}); "
              f"{chip_bytes / 2**30:.3f} GiB per chip per step -> {si(chip_bytes / step_s, 'B/s')} achieved")
    print(peak_memory(mesh))


# ------------------------------------------------------------------ CLI
def positive(name):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v
    return parse


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                    help="paper: configs/embedder_2b.json and configs/egrl_8b.json; tiny: the toy configs (CPU smoke run)")
    ap.add_argument("--embedder-config", help="train-embedder config instead of the preset's (e.g. configs/embedder_4b.json)")
    ap.add_argument("--reasoner-config", help="train-reasoner config instead of the preset's; its policy is decoded")
    ap.add_argument("--mesh", metavar="D,F,T", help="data,fsdp,tensor over the local devices (default 1,-1,1: all on fsdp, as the presets)")
    ap.add_argument("--devices", type=positive("--devices"),
                    help="use the first N local devices (default all): e.g. one chip's figures without collectives")
    ap.add_argument("--layers", type=positive("--layers"), help="cut both models' text decoders to N layers (memory)")
    ap.add_argument("--seqs-per-chip", type=positive("--seqs-per-chip"), default=4,
                    help="sequences per chip in each tower forward (pairs per GradCache chunk / batch devices)")
    ap.add_argument("--chunks", type=positive("--chunks"), help="GradCache chunks per step (default: the config's)")
    ap.add_argument("--tokens", type=positive("--tokens"), help="padded tokens per sequence (default: the config's budget)")
    ap.add_argument("--steps", type=positive("--steps"), default=5, help="timed train steps")
    ap.add_argument("--warmup", type=positive("--warmup"), default=2, help="untimed calls after compiling, each part")
    ap.add_argument("--cache-len", type=positive("--cache-len"), help="KV-cache slots per sequence (paper default 4096)")
    ap.add_argument("--decode-seqs-per-chip", type=positive("--decode-seqs-per-chip"), help="decode rows per chip")
    ap.add_argument("--decode-steps", type=positive("--decode-steps"), default=64, help="greedy tokens per timed call")
    ap.add_argument("--decode-repeats", type=positive("--decode-repeats"), default=3, help="timed decode calls")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides of the Embedder config")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except UserError as e:  # a bad config, override or model key: one line naming it, no traceback
        raise SystemExit(f"accelerator.py: {e}") from None


def run(args) -> int:
    for name in ("embedder_config", "reasoner_config"):
        value = getattr(args, name)
        if value:
            plan_lib.load_run_config(value)  # a missing or malformed file is named before any device work
    mesh_cfg = MeshConfig.parse(args.mesh) if args.mesh else MeshConfig()
    devices = jax.local_devices()
    if args.devices is not None and args.devices > len(devices):
        raise SystemExit(f"--devices {args.devices}: this process has {len(devices)} local devices")
    try:
        mesh = make_mesh(mesh_cfg, devices=devices[:args.devices] if args.devices else None)
    except ValueError as e:
        raise SystemExit(f"--mesh {args.mesh or '1,-1,1'}: {e}") from None
    line, chip = describe(mesh)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()) + f"; python {sys.version.split()[0]}")
    print(line)
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for skip, name, bench, help_ in (
                (args.skip_train, "Embedder train step", lambda: bench_train(args, mesh, chip, tmp),
                 "--seqs-per-chip (fewer), --tokens (shorter), --layers N, or --set remat=full"),
                (args.skip_decode, "Reasoner decode", lambda: bench_decode(args, mesh, chip),
                 "--decode-seqs-per-chip (fewer), --cache-len (shorter), or --layers N")):
            if skip:
                continue
            try:
                bench()
            except jax.errors.JaxRuntimeError as e:  # out of device memory: say so, go on to the next part
                first = str(e).strip().splitlines()[0][:300]
                print(f"\n== {name}: FAILED: {first}" + (f"; would help: {help_}" if "RESOURCE_EXHAUSTED" in first else ""))
                failed = 1
    return failed


if __name__ == "__main__":
    sys.exit(main())
