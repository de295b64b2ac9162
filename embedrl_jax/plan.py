"""`embedrl plan`: every jitted program of a run, compiled for a real TPU slice from a CPU host.

Why: whether a config fits a slice is known before paying for it. With libtpu installed,
`jax.experimental.topologies.get_topology_desc` gives compile-only TPU devices. The trainers
are built on a mesh of them from shapes alone (`abstract=True`: the trainer core's abstract
model source) and their own `programs()` give the jitted update with its abstract arguments,
so lowering and compiling runs the real TPU compiler on exactly the program a run compiles;
`memory_analysis()` and `cost_analysis()` are per chip. The model takes the TPU path because
it follows the mesh's platform (models.platform), not the host. Nothing here reads weights
or data: model shapes come from config.json (a directory's, or the presets in
configs/models/), batch shapes from the config's batch sizes, token budgets and buckets.

    embedrl plan --config configs/embedder_2b.json --topology v5p-64 [--slices K] [--mesh D,F,T]
                 [--tokens N] [--programs P,...] [--json] [key=value ...]

One small function per program (`embedder_train_program`, `sft_train_program`,
`grpo_update_program`, `rollout_program`, `reward_embed_program`, `judge_program`) builds the
jitted function and its abstract arguments; `plan()` compiles each and reports.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .chips import ALIASES, TPU_CHIPS as CHIPS, Chip
from .errors import UserError

GiB = 2**30
EXIT_DOES_NOT_FIT = 3


# ------------------------------------------------------------------ chips and topologies
TOPOLOGY_FORMS = ("libtpu chip grids: v4:2x2x2, v5e:8x8, v5e:16x16, v5p:2x4x4, v5p:4x4x4, v6e:4x4, v6e:16x16; "
                  "Cloud accelerator types: v4-N / v5p-N (N TensorCores = 2 per chip, v5p-64 is 32 chips), "
                  "v5e-N / v5litepod-N / v6e-N (N chips); cpu:N (N host CPU devices)")


@dataclasses.dataclass
class Target:
    name: str  # as the user wrote it
    platform: str  # "tpu" | "cpu"
    libtpu_name: str | None
    devices: list
    chip: Chip
    slices: int

    @property
    def chips(self) -> int:
        return len(self.devices)

    @property
    def hosts(self) -> int:
        return len({(getattr(d, "slice_index", 0), d.process_index) for d in self.devices})


def _grid(chips: int, dims: int) -> str:
    """A chip grid for a power-of-two count, as balanced as the torus allows (32 -> 2x4x4)."""
    e = chips.bit_length() - 1
    if chips < 1 or 2**e != chips:
        raise UserError(f"{chips} chips: only powers of two map to a slice grid ({TOPOLOGY_FORMS})")
    base, rem = divmod(e, dims)
    exps = [base] * dims
    for i in range(rem):
        exps[dims - 1 - i] += 1
    if dims == 3 and base == 0:  # small v4 / v5p slices are 2x2x1, 2x1x1
        exps = sorted(exps, reverse=True)
    return "x".join(str(2**x) for x in exps)


def parse_topology(name: str) -> tuple[str, str | None, int | None]:
    """-> (platform, libtpu topology name or None, cpu device count or None); bad names list the forms."""
    text = name.strip().lower()
    m = re.fullmatch(r"cpu:(\d+)", text)
    if m:
        n = int(m.group(1))
        if n < 1:
            raise UserError(f"--topology {name!r}: cpu:N needs N >= 1")
        return "cpu", None, n
    m = re.fullmatch(r"(v\w+?):(\d+(?:x\d+){1,2})", text)
    if m and ALIASES.get(m.group(1), m.group(1)) in CHIPS:
        kind = ALIASES.get(m.group(1), m.group(1))
        return "tpu", f"{kind}:{m.group(2)}", None
    m = re.fullmatch(r"(v\w+?)-(\d+)", text)
    if m and ALIASES.get(m.group(1), m.group(1)) in CHIPS:
        chip = CHIPS[ALIASES.get(m.group(1), m.group(1))]
        n = int(m.group(2))
        if n % chip.cores_per_chip:
            raise UserError(f"--topology {name!r}: {chip.kind} types count TensorCores ({chip.cores_per_chip} per chip)")
        return "tpu", f"{chip.kind}:{_grid(n // chip.cores_per_chip, chip.grid_dims)}", None
    raise UserError(f"unknown topology {name!r}; accepted forms: {TOPOLOGY_FORMS}")


def resolve_target(name: str, slices: int = 1) -> Target:
    platform, libtpu_name, n_cpu = parse_topology(name)
    if slices < 1:
        raise UserError(f"--slices must be >= 1, got {slices}")
    if platform == "cpu":
        import jax

        if slices != 1:
            raise UserError("--slices applies to TPU topologies only")
        have = jax.devices("cpu")
        if len(have) < n_cpu:
            raise UserError(f"--topology cpu:{n_cpu} needs {n_cpu} host devices, this process has {len(have)} "
                             f"(start it with XLA_FLAGS=--xla_force_host_platform_device_count={n_cpu})")
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        chip = Chip("cpu", total // n_cpu, None, None, 1, 1)
        return Target(name, "cpu", None, list(have[:n_cpu]), chip, 1)
    from jax.experimental import topologies

    # compile-only: no chip is claimed, so several planners (and test processes) may load
    # libtpu at once instead of failing on its single-process lockfile
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kw = {"num_slices": slices} if slices > 1 else {}
    try:
        topo = topologies.get_topology_desc(topology_name=libtpu_name, platform="tpu", **kw)
    except Exception as e:  # libtpu refuses the grid (or is missing)
        raise UserError(f"topology {name!r} ({libtpu_name}): libtpu refused it: {str(e).splitlines()[0]}; "
                         f"accepted forms: {TOPOLOGY_FORMS}") from None
    return Target(name, "tpu", libtpu_name, list(topo.devices), CHIPS[libtpu_name.split(":")[0]], slices)


def _remats(cfg, mesh) -> bool:
    """Whether the compiled step recomputes its forward: the config's policy as the model resolves
    it for the mesh's platform ("auto" is full remat on accelerators, none on XLA:CPU)."""
    from .models.platform import Target as PlatformTarget, remat_name

    return remat_name(cfg.remat, PlatformTarget(mesh.devices.flat[0].platform)) != "none"


def build_mesh(mesh_config, target: Target):
    """The run's (data, fsdp, tensor) mesh over the target's devices: `sharding.make_mesh` with
    `mesh.slices` = the target's slices (data, fsdp and tensor then describe one slice; the
    slices stack along data over DCN)."""
    from .sharding import make_mesh

    try:
        return make_mesh(dataclasses.replace(mesh_config, slices=target.slices), devices=target.devices)
    except ValueError as e:  # the mesh does not multiply to the chips, or slices do not match
        raise UserError(f"--topology {target.name}: {e}") from None


# ------------------------------------------------------------------ configs and model shapes
def _kinds():
    from .train.reasoner import ReasonerRLConfig
    from .train.embedder import EmbedderTrainConfig
    from .train.sft import SFTConfig

    # a key only this kind has, to tell them apart when a file would load as several
    return {"embedder": (EmbedderTrainConfig, "grad_cache_chunks"), "sft": (SFTConfig, "micro_batches"),
            "egrl": (ReasonerRLConfig, "rollout")}


def load_run_config(path: str, overrides=()):
    """(kind, config) for a train-embedder, sft-reasoner or train-reasoner config file or preset."""
    from .config import apply_overrides, load_config

    raw = None
    p = Path(path)
    if p.is_file():
        try:
            raw = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON: {e}") from None
    loaded, errors = {}, []
    for kind, (cls, marker) in _kinds().items():
        try:
            cfg = load_config(path, cls)
        except (TypeError, ValueError) as e:
            errors.append(f"{cls.__name__}: {e}")
            continue
        loaded[kind] = (cfg, marker)
    if not loaded:
        raise UserError(f"{path} is not a train-embedder, sft-reasoner or train-reasoner config:\n  " + "\n  ".join(errors))
    if len(loaded) > 1:
        keys = set(raw or {})
        marked = [k for k, (_, marker) in loaded.items() if marker in keys]
        if len(marked) != 1:
            raise UserError(f"{path} loads as several run configs ({sorted(loaded)}); add the key that names its "
                             f"kind ({', '.join(f'{k}: {m}' for k, (_, m) in loaded.items())})")
        loaded = {marked[0]: loaded[marked[0]]}
    kind, (cfg, _) = next(iter(loaded.items()))
    return kind, apply_overrides(cfg, overrides)


def model_shape_config(value: str, key: str):
    """The architecture (`Qwen3VLConfig`) a model key points at, without touching weights.

    A directory's config.json; else a preset in configs/models/ matched by the last path part
    (`Qwen/Qwen3-VL-2B-Instruct` -> qwen3_vl_2b_instruct); "tiny" is the trainers' toy base.
    """
    from .models.qwen3_vl.config import Qwen3VLConfig, load_preset

    if value == "tiny":
        from .toy.base import tiny_hf_config

        return Qwen3VLConfig.from_hf_dict(tiny_hf_config(vocab=1024).to_dict())
    path = Path(value).expanduser()
    if (path / "config.json").is_file():
        return Qwen3VLConfig.from_json(path)
    name = re.sub(r"[^a-z0-9]+", "_", path.name.lower()).strip("_")
    try:
        return load_preset(name)
    except ValueError as e:
        raise UserError(f"config key {key}={value!r}: the planner cannot shape it: no config.json there and "
                         f"no preset {name!r} ({e}); give a directory with config.json or a preset name") from None


# ------------------------------------------------------------------ abstract arguments
def _struct(shape, dtype, sharding):
    import jax

    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), dtype, sharding=sharding)


def _replicated(mesh):
    from jax.sharding import NamedSharding, PartitionSpec as P

    return NamedSharding(mesh, P())


def abstract_key(mesh):
    import jax

    k = jax.eval_shape(lambda: jax.random.key(0))
    return _struct(k.shape, k.dtype, _replicated(mesh))


TEXT_ARRAYS = {"input_ids": "int32", "attention_mask": "int32", "positions": "int32", "visual_index": "int32"}
VISION_ARRAYS = {"patches": "float32", "segment_ids": "int32", "pos_idx": "int32", "pos_w": "float32", "rowcol": "int32"}


def batch_devices(mesh) -> int:
    from .sharding import RULES

    axes = dict(RULES)["batch"]
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def packed_batch(mcfg, mesh, rows: int, seq: int, vision: tuple[int, int] | None, lead: tuple[int, ...] = (),
                 extra: dict | None = None):
    """Abstract packed arrays (the layout of `models.qwen3_vl.inputs.pack_inputs`) for `rows`
    sequences of `seq` tokens and `vision` = (patch rows, row length), with leading stacked
    dims `lead` (GradCache chunks, micro- or mini-batches), sharded as the trainers place them."""
    from .hf import BATCH_AXES
    from .sharding import named_sharding

    shapes = {"input_ids": (rows, seq), "attention_mask": (rows, seq), "positions": (3, rows, seq),
              "visual_index": (rows, seq)}
    dtypes = dict(TEXT_ARRAYS)
    if vision is not None:
        r, n = vision
        v = mcfg.vision
        shapes.update(patches=(r, n, v.patch_dim), segment_ids=(r, n), pos_idx=(r, n, 4), pos_w=(r, n, 4),
                      rowcol=(r, n, 2))
        dtypes.update(VISION_ARRAYS)
    axes = {k: BATCH_AXES[k] for k in shapes}
    for k, (shape, dtype, names) in (extra or {}).items():
        shapes[k], dtypes[k], axes[k] = shape, dtype, names
    out = {}
    for k, shape in shapes.items():
        names = (None,) * len(lead) + tuple(axes[k])
        full = tuple(lead) + tuple(shape)
        out[k] = _struct(full, np.dtype(dtypes[k]), named_sharding(names, full, mesh))
    return out


# ------------------------------------------------------------------ shapes from budgets
def vision_tokens(inputs) -> int:
    """Merged visual tokens of the largest item the input config admits: one image at its
    budget or a video of num_frames frames at the frame budget."""
    return max(inputs.image_max_tokens, inputs.num_frames * inputs.frame_max_tokens)


def image_rows(inputs, merge_unit: int, buckets, items: int, mesh) -> tuple[int, int]:
    """(patch rows, row length) for `items` items of one image each at the image budget: one
    image per row, rows rounded to the batch devices as `hosts_shape` does on a pod."""
    patches = inputs.image_max_tokens * merge_unit
    row_len = int(math.ceil(buckets.patches(patches) / merge_unit) * merge_unit)
    rows = buckets.rows(items)
    split = batch_devices(mesh)
    return -(-rows // split) * split, row_len


TEMPLATE_TOKENS = 64  # chat template, vision markers, instruction suffix, <emb>


def text_budget(inputs, key: str, tokens: int | None, extra: int = 0) -> int:
    """Unpadded tokens of the longest item: visual tokens + text budget + template (+ extra)."""
    if tokens is not None:
        return tokens
    if inputs.max_text_tokens is None:
        raise UserError(f"config key {key}.max_text_tokens is null: the planner cannot shape the text without "
                         "reading data; set it or pass --tokens N")
    return vision_tokens(inputs) + inputs.max_text_tokens + TEMPLATE_TOKENS + extra


# ------------------------------------------------------------------ analytic FLOPs
def matmul_params(mcfg) -> tuple[int, int, int]:
    """(decoder matmul weights, vision matmul weights, LM head) counts: what 2·params·tokens uses."""
    t, v = mcfg.text, mcfg.vision
    d, hd = t.hidden_size, t.head_dim
    attn = d * hd * (t.num_attention_heads * 2 + t.num_key_value_heads * 2)
    dec = t.num_hidden_layers * (attn + 3 * d * t.intermediate_size)
    vd = v.hidden_size
    merge = v.spatial_merge_size**2
    vis = v.depth * (4 * vd * vd + 2 * vd * v.intermediate_size)
    merger = (vd * merge) ** 2 + vd * merge * v.out_hidden_size
    vis += merger * (1 + len(v.deepstack_visual_indexes)) + v.patch_dim * vd
    return dec, vis, d * t.vocab_size


def forward_flops(mcfg, rows: int, seq: int, vision: tuple[int, int] | None, head_tokens: int = 0) -> float:
    """One forward: 2·params·tokens for the decoder and vision matmuls, the LM head over
    `head_tokens`, and attention (QK^T and PV over the full padded square, as computed)."""
    t, v = mcfg.text, mcfg.vision
    dec, vis, head = matmul_params(mcfg)
    f = 2.0 * dec * rows * seq + 2.0 * head * head_tokens
    f += 4.0 * t.num_hidden_layers * rows * t.num_attention_heads * t.head_dim * seq * seq
    if vision is not None:
        r, n = vision
        f += 2.0 * vis * r * n + 4.0 * v.depth * r * v.num_heads * v.head_dim * n * n
    return f


def train_multiplier(full_finetune: bool, remat: bool) -> float:
    """Forward + backward as multiples of a forward: the backward is 2 forwards with weight
    gradients (full fine-tuning), ~1 without (LoRA: input gradients only; the adapters are
    small); remat adds the recomputed forward."""
    return (3.0 if full_finetune else 2.0) + (1.0 if remat else 0.0)


# ------------------------------------------------------------------ programs
@dataclasses.dataclass
class Program:
    name: str
    fn: Callable  # the jitted function
    args: tuple  # abstract arguments
    shapes: dict  # the global batch shapes it compiles
    tokens_per_step: int
    analytic_flops: float  # whole program, all chips: everything it executes (recompute included)
    hints: dict = dataclasses.field(default_factory=dict)  # config keys that would shrink it
    model_flops: float | None = None  # the model's own work (no remat / GradCache recompute), for MFU


def model_source(value: str, key: str) -> str:
    """A model key as the trainers' abstract model source takes it ("tiny", a directory with
    config.json, a config file, or a preset name): an HF id such as `Qwen/Qwen3-VL-2B-Instruct`
    becomes the preset of its last path part; anything else the planner cannot shape is named."""
    if value == "tiny" or (Path(value).expanduser() / "config.json").is_file():
        return value
    model_shape_config(value, key)  # raises, naming the key, when there is no preset
    return re.sub(r"[^a-z0-9]+", "_", Path(value).name.lower()).strip("_")


def abstract_trainer(cls, cfg, mesh, **sources):
    """The run's trainer built from shapes alone (`abstract=True`): no weights, data or workdir."""
    cfg = dataclasses.replace(cfg, **{k: model_source(getattr(cfg, k), k) for k in sources})
    return cls(cfg, Path("."), mesh=mesh, abstract=True)


def _update(trainer, **dims):
    fn, args = trainer.programs(**dims)["update"]
    return fn, args


def run_buckets(cfg, mesh):
    """The buckets a run of `cfg` on `mesh` packs with (splash's block multiple included)."""
    from .train.core import run_buckets as buckets

    return buckets(cfg, mesh)


def embedder_train_program(cfg, mesh, tokens=None) -> Program:
    """`EmbedderTrainer`'s jitted update (train/embedder.py), built by the trainer from shapes."""
    from .train.embedder import EmbedderTrainer

    pairs = cfg.data.sub_batch_size * cfg.data.sub_batches_per_batch
    chunks = cfg.grad_cache_chunks
    if pairs % chunks:
        raise UserError(f"config key grad_cache_chunks={chunks} does not divide the {pairs} pairs of a step")
    trainer = abstract_trainer(EmbedderTrainer, cfg, mesh, model=True)
    mcfg = trainer.mdef.config
    b = pairs // chunks
    buckets = run_buckets(cfg, mesh)
    seq = buckets.seq(text_budget(cfg.inputs, "inputs", tokens))
    vision = image_rows(cfg.inputs, mcfg.vision.merge_unit, buckets, b, mesh)
    fn, args = _update(trainer, pairs=pairs, seq=seq, vision=vision)
    remat = _remats(cfg, mesh)
    fwd = 2 * forward_flops(mcfg, pairs, seq, (vision[0] * chunks, vision[1]))  # both towers
    mult = train_multiplier(cfg.lora is None, remat) + (1.0 if chunks > 1 else 0.0)  # GradCache: a 2nd forward
    shapes = {"pairs": pairs, "sequences": 2 * pairs, "grad_cache_chunks": chunks, "pairs_per_chunk": b,
              "padded_tokens": seq, "patch_rows": 2 * vision[0] * chunks, "patch_row_len": vision[1]}
    hints = {"chunks": "grad_cache_chunks", "frozen_dtype": "base_dtype", **({} if remat else {"remat": "remat"})}
    return Program("embedder_train_step", fn, args, shapes,
                   2 * pairs * seq, fwd * mult, hints, fwd * train_multiplier(cfg.lora is None, False))


def _prompt_tokens(inputs, max_prompt_tokens: int, tokens):
    if tokens is not None:
        return tokens
    if inputs.max_text_tokens is None:
        return max_prompt_tokens
    return min(max_prompt_tokens, vision_tokens(inputs) + inputs.max_text_tokens + TEMPLATE_TOKENS)


def sft_train_program(cfg, mesh, tokens=None) -> Program:
    """`SFTTrainer`'s jitted update (train/sft.py): [micro_batches, R, P + T] sequences."""
    from .train.sft import SFTTrainer

    m = cfg.micro_batches
    if cfg.batch_size % m:
        raise UserError(f"config key micro_batches={m} does not divide batch_size={cfg.batch_size}")
    trainer = abstract_trainer(SFTTrainer, cfg, mesh, model=True)
    mcfg = trainer.mdef.config
    r = cfg.batch_size // m
    buckets = run_buckets(cfg, mesh)
    p_len = buckets.seq(_prompt_tokens(cfg.inputs, cfg.max_prompt_tokens, tokens))
    t_len = min(buckets.seq(cfg.max_completion_tokens), cfg.max_completion_tokens)
    vision = image_rows(cfg.inputs, mcfg.vision.merge_unit, buckets, r, mesh)
    fn, args = _update(trainer, samples=cfg.batch_size, prompt=p_len, completion=t_len, vision=vision)
    remat = _remats(cfg, mesh)
    fwd = m * forward_flops(mcfg, r, p_len + t_len, vision, head_tokens=r * t_len)
    shapes = {"sequences": cfg.batch_size, "micro_batches": m, "prompt_tokens": p_len, "completion_tokens": t_len,
              "padded_tokens": p_len + t_len, "patch_rows": vision[0] * m, "patch_row_len": vision[1]}
    hints = {"chunks": "micro_batches", "frozen_dtype": "base_dtype", **({} if remat else {"remat": "remat"})}
    return Program("sft_train_step", fn, args, shapes,
                   cfg.batch_size * (p_len + t_len), fwd * train_multiplier(cfg.lora is None, remat), hints,
                   fwd * train_multiplier(cfg.lora is None, False))


def _rl_models(cfg):
    """(policy, embedder, judge) architectures; the toy task builds tiny ones at run time."""
    if cfg.toy is not None:
        tiny = model_shape_config("tiny", "toy")
        return tiny, tiny, tiny
    for key in ("policy", "embedder"):
        if not getattr(cfg, key):
            raise UserError(f"config key {key} is empty: the planner needs the model's architecture "
                             "(a directory with config.json or a preset name)")
    policy = model_shape_config(cfg.policy, "policy")
    judge = model_shape_config(cfg.judge, "judge") if cfg.judge else policy
    return policy, model_shape_config(cfg.embedder, "embedder"), judge


_RL_TRAINERS: dict = {}


def rl_trainer(cfg, mesh):
    """The run's `ReasonerRLTrainer` from shapes alone (the toy task's policy is the toy base),
    built once per (config, mesh) for the four EG-RL programs."""
    from .train.reasoner import ReasonerRLTrainer

    key = (id(cfg), id(mesh))
    if key in _RL_TRAINERS and _RL_TRAINERS[key][:2] == (cfg, mesh):
        return _RL_TRAINERS[key][2]
    _rl_models(cfg)  # names an empty or unshapeable model key
    if cfg.toy is not None:
        trainer = ReasonerRLTrainer(dataclasses.replace(cfg, policy="tiny"), Path("."), mesh=mesh, abstract=True)
    else:
        trainer = abstract_trainer(ReasonerRLTrainer, cfg, mesh, policy=True)
    _RL_TRAINERS.clear()
    _RL_TRAINERS[key] = (cfg, mesh, trainer)
    return trainer


def _rollout_shape(cfg, mesh, mcfg, tokens):
    prompts = 2 * cfg.rollout.pairs_per_step
    p_len = run_buckets(cfg, mesh).seq(_prompt_tokens(cfg.inputs, cfg.rollout.max_prompt_tokens, tokens))
    return prompts, p_len, cfg.rollout.max_new_tokens


def grpo_update_program(cfg, mesh, tokens=None) -> Program:
    """`ReasonerRLTrainer`'s jitted GRPO update (train/reasoner.py), built by the trainer from
    shapes: M mini-batches of R = 2B·n / M rollouts, each a prompt (left padded to the bucket)
    + max_new_tokens."""
    trainer = rl_trainer(cfg, mesh)
    policy = trainer.mdef.config
    prompts, p_len, t_len = _rollout_shape(cfg, mesh, policy, tokens)
    m, n = cfg.grpo.mini_batches, cfg.rollout.samples
    if prompts % m:
        raise UserError(f"config key grpo.mini_batches={m} does not divide the {prompts} prompts of a step")
    r = prompts // m * n
    vision = image_rows(cfg.inputs, policy.vision.merge_unit, run_buckets(cfg, mesh), prompts // m, mesh)
    fn, args = _update(trainer, prompts=prompts, prompt=p_len, vision=vision)
    remat = _remats(cfg, mesh)
    fwd = m * forward_flops(policy, r, p_len + t_len, vision, head_tokens=r * t_len)
    passes = train_multiplier(cfg.lora is None, remat) + (1.0 if cfg.grpo.kl_coef else 0.0) + (1.0 if m > 1 else 0.0)
    shapes = {"rollouts": prompts * n, "mini_batches": m, "rows_per_mini_batch": r, "prompt_tokens": p_len,
              "completion_tokens": t_len, "padded_tokens": p_len + t_len, "patch_rows": vision[0] * m,
              "patch_row_len": vision[1]}
    hints = {"chunks": "grpo.mini_batches", "frozen_dtype": "base_dtype", "bucket": "rollout.max_prompt_tokens",
             **({} if remat else {"remat": "remat"})}
    return Program("grpo_update", fn, args, shapes, prompts * n * (p_len + t_len), fwd * passes,
                   hints, fwd * (passes - (1.0 if remat else 0.0)))


def _generate_program(name, mdef, params, mesh, rows, p_len, vision, new_tokens, temperature, eos_ids, hints,
                      lead_note, dtype=None):
    """reason/sampler.py's jitted prefill + decode loop; its layer loop follows the mesh the
    program is traced under (compile_program traces inside `jax.set_mesh(mesh)`)."""
    from .reason.sampler import jitted_generate
    from .sharding import named_sharding

    fn = jitted_generate(mdef, new_tokens, eos_ids, temperature, 0, 1.0, dtype=dtype)
    batch = packed_batch(mdef.config, mesh, rows, p_len, vision)
    deltas = _struct((rows,), np.int32, named_sharding(("batch",), (rows,), mesh))
    cfg_t = mdef.config.text
    decode = 2.0 * sum(matmul_params(mdef.config)[::2]) * rows * new_tokens  # decoder + LM head per new token
    decode += 4.0 * cfg_t.num_hidden_layers * rows * cfg_t.num_attention_heads * cfg_t.head_dim * new_tokens * (p_len + new_tokens)
    prefill = forward_flops(mdef.config, rows, p_len, vision, head_tokens=rows)
    shapes = {"sequences": rows, "prompt_tokens": p_len, "new_tokens": new_tokens,
              "kv_cache_tokens": p_len + new_tokens, **lead_note}
    if vision is not None:
        shapes.update(patch_rows=vision[0], patch_row_len=vision[1])
    return Program(name, fn, (params, batch, deltas, abstract_key(mesh)), shapes, rows * (p_len + new_tokens),
                   prefill + decode, hints)


def rollout_program(cfg, mesh, tokens=None) -> Program:
    """reason/sampler.py's jitted prefill + KV-cache decode loop (one program) on the trainer's
    live policy (`policy_params()`), for the step's 2B prompts × n samples."""
    trainer = rl_trainer(cfg, mesh)
    policy = trainer.mdef.config
    prompts, p_len, t_len = _rollout_shape(cfg, mesh, policy, tokens)
    vision = image_rows(cfg.inputs, policy.vision.merge_unit, run_buckets(cfg, mesh), prompts, mesh)
    hints = {"chunks": "rollout.pairs_per_step", "bucket": "rollout.max_prompt_tokens", "frozen_dtype": "base_dtype"}
    return _generate_program("rollout", trainer.mdef, trainer.policy_params(), mesh, prompts * cfg.rollout.samples,
                             p_len, vision, t_len, cfg.rollout.temperature, (151645, 151643), hints, {"prompts": prompts},
                             dtype=cfg.compute_dtype)


def _frozen_model(cfg, trainer, key: str, dtype: str):
    """A frozen model of the run (reward Embedder, separate judge) from the trainer's abstract
    model source: the handle `load_model` would give, as ShapeDtypeStructs on the mesh."""
    src = "tiny" if cfg.toy is not None else model_source(getattr(cfg, key), key)
    return trainer.load_base(src, dtype=dtype)


def reward_embed_program(cfg, mesh, tokens=None) -> Program:
    """The frozen Embedder's forward (`embed.embedder.embed_rows`, jitted as `Embedder.encode`
    does) over one batch of `embed_batch_size` rollouts: item + T-CoT (≤ max_new_tokens)."""
    import functools

    import jax

    from .embed.embedder import _jitted_embed

    trainer = rl_trainer(cfg, mesh)
    handle = _frozen_model(cfg, trainer, "embedder", cfg.embed_dtype)
    emb_cfg = handle.model_config
    mdef = handle.model_def
    rows = cfg.embed_batch_size
    buckets = run_buckets(cfg, mesh)
    seq = buckets.seq(text_budget(cfg.embed_inputs, "embed_inputs", tokens, extra=cfg.rollout.max_new_tokens))
    vision = image_rows(cfg.embed_inputs, emb_cfg.vision.merge_unit, buckets, rows, mesh)
    batch = packed_batch(emb_cfg, mesh, rows, seq, vision)
    tok = _struct((), np.int32, _replicated(mesh))
    call = functools.partial(_jitted_embed(mdef), dtype=handle.dtype)  # as Embedder.encode: its weights' dtype
    shapes = {"sequences": rows, "padded_tokens": seq, "patch_rows": vision[0], "patch_row_len": vision[1],
              "calls_per_step": -(-2 * 2 * cfg.rollout.pairs_per_step * cfg.rollout.samples // rows)}
    hints = {"chunks": "embed_batch_size", "frozen_dtype": "embed_dtype"}
    return Program("reward_embed", jax.jit(call), (handle.params, batch, tok), shapes, rows * seq,
                   forward_flops(emb_cfg, rows, seq, vision), hints)


def judge_program(cfg, mesh, tokens=None) -> Program:
    """The judge: greedy `judge_max_new_tokens` on text prompts of `judge_batch_size` rows, each
    a query with its reasoning and n + judge_top_k candidate reasonings (≤ max_new_tokens each).
    `judge: null` is the trainer's frozen reference policy, as in a run."""
    trainer = rl_trainer(cfg, mesh)
    if cfg.judge is None:
        mdef, params = trainer.ref_mdef, trainer.ref_params
    else:
        handle = _frozen_model(cfg, trainer, "judge", cfg.base_dtype)
        mdef, params = handle.model_def, handle.params
    cands = cfg.rollout.samples + cfg.reward.judge_top_k
    est = (cands + 1) * cfg.rollout.max_new_tokens + (cands + 1) * 512 + TEMPLATE_TOKENS
    p_len = run_buckets(cfg, mesh).seq(tokens if tokens is not None else est)
    hints = {"chunks": "judge_batch_size", "frozen_dtype": "base_dtype"}
    return _generate_program("judge", mdef, params, mesh, cfg.judge_batch_size, p_len, None, cfg.judge_max_new_tokens,
                             0.0, (151645, 151643), hints, {"candidates": cands})


def programs_for(kind: str, cfg) -> dict[str, Callable]:
    """The programs a run of this kind compiles, by the name its report gives each."""
    if kind == "embedder":
        return {"embedder_train_step": embedder_train_program}
    if kind == "sft":
        return {"sft_train_step": sft_train_program}
    out = {"rollout": rollout_program, "reward_embed": reward_embed_program, "grpo_update": grpo_update_program}
    if cfg.reward.use_judge:
        out["judge"] = judge_program
    return out


# ------------------------------------------------------------------ HLO collectives
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_SHAPE = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\([^)]*\))?.*\{\s*$")
_OP = re.compile(r"=\s*(\(.*?\)|[a-z]+\d*[a-z0-9]*\[[\d,]*\][^ ]*)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_COMMENT = re.compile(r"/\*.*?\*/")
_CALLS = re.compile(r"\b(?:body|condition|to_apply|calls)=%?([\w.\-]+)|\b(?:branch_computations|called_computations)=\{([^}]*)\}")


def _bytes_of(shape_text: str, start: bool) -> int:
    shapes = [sh for sh in _SHAPE.findall(shape_text) if not start or sh[1]]  # starts carry scalar contexts
    if start and len(shapes) > 1:  # async start: (operands..., results...): count the result
        shapes = shapes[len(shapes) // 2:]
    total = 0
    for dtype, dims in shapes:
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += n * _DTYPE_BYTES.get(dtype, 4)
    return total


def collectives(hlo: str) -> dict[str, dict[str, int]]:
    """Collectives in optimized HLO text by kind: static count and bytes (result sizes), and
    how many of them sit inside the program's own loops (the layer scan, GradCache / micro- and
    mini-batch loops, the decode loop; XLA's windowed-einsum loops count only when nested in
    one). An op inside a loop runs once per iteration: counts here are per appearance."""
    comp, ops, edges, loop_roots = None, [], {}, set()
    for line in hlo.splitlines():
        s = _COMMENT.sub("", line).strip()
        m = _COMP.match(s)
        if m and "=" not in s.split("{")[0]:
            comp = m.group(1)
            edges.setdefault(comp, set())
            continue
        if comp is None:
            continue
        for one, many in _CALLS.findall(s):
            names = {x.strip().lstrip("%") for x in (one or many).split(",") if x.strip()}
            edges[comp].update(names)
            if " while(" in s and "windowed_dot_general" not in s:  # not XLA's own collective-matmul loops
                loop_roots.update(names)
        m = _OP.search(s)
        if m:
            ops.append((comp, m.group(2), _bytes_of(m.group(1), bool(m.group(3)))))
    in_loop, todo = set(), list(loop_roots)
    while todo:
        c = todo.pop()
        if c not in in_loop:
            in_loop.add(c)
            todo.extend(edges.get(c, ()))
    out = {}
    for c, kind, nbytes in ops:
        d = out.setdefault(kind, {"count": 0, "bytes": 0, "in_loop_count": 0, "in_loop_bytes": 0})
        d["count"] += 1
        d["bytes"] += nbytes
        if c in in_loop:
            d["in_loop_count"] += 1
            d["in_loop_bytes"] += nbytes
    return out


# ------------------------------------------------------------------ compile and report
def _gib(x) -> str:
    return f"{x / GiB:.2f} GiB"


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_HBM_OOM = re.compile(r"memory required for HLO (\w+) \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")


def oom_bytes(error: str | None) -> dict | None:
    """What the TPU compiler said it needed when it refused a program for HBM (it compiles only
    programs that fit, so a too-large program has no memory analysis, only this message)."""
    m = _HBM_OOM.search(error or "")
    if not m:
        return None
    return {"what": m.group(1), "required": int(float(m.group(2)) * _UNITS[m.group(3)]),
            "available": int(float(m.group(4)) * _UNITS[m.group(5)])}


def _verdict(rep: dict, prog: Program | None, target: Target, mesh) -> str:
    if rep["error"]:
        first = rep["error"].strip().splitlines()[0][:200]
        oom = oom_bytes(rep["error"])
        if oom:
            return (f"does not fit: the compiler needs {_gib(oom['required'])} of HLO {oom['what']} per chip, "
                    f"{_gib(oom['required'] - oom['available'])} over the {_gib(oom['available'])} it can use; "
                    f"would help: {_help(prog, 'temporaries', mesh)}")
        vm = "VMEM" in rep["error"] or "RESOURCE_EXHAUSTED" in rep["error"]
        help_ = _help(prog, "temporaries", mesh) if vm else "see error"
        return f"does not compile: {first}" + (f"; would help: {help_}" if vm else "")
    b, hbm = rep["bytes_per_chip"], rep["hbm_bytes_per_chip"]
    if rep["fits"]:
        return f"fits: {_gib(b['total'])} of {_gib(hbm)} per chip ({100 * b['total'] / hbm:.0f}%)"
    over = b["total"] - hbm
    big = max(("arguments", "temporaries", "outputs"), key=lambda k: b[k])
    return (f"does not fit: needs {_gib(b['total'])} per chip, {_gib(over)} over the {_gib(hbm)} HBM; "
            f"largest item {big} ({_gib(b[big])}); would help: {_help(prog, big, mesh)}")


def _replicated_batch(prog: Program | None, mesh) -> int | None:
    """Rows of a batch the mesh cannot split (the rules table then replicates it on every chip)."""
    def find(x):
        if isinstance(x, dict):
            if "input_ids" in x and hasattr(x["input_ids"], "sharding"):
                return x["input_ids"]
            return next((f for f in map(find, x.values()) if f is not None), None)
        if isinstance(x, (tuple, list)):
            return next((f for f in map(find, x) if f is not None), None)
        return None

    ids = find(prog.args) if prog else None
    if ids is None or batch_devices(mesh) == 1:
        return None
    rows = ids.shape[-2]
    return rows if ids.sharding.spec[len(ids.shape) - 2] is None else None


def _help(prog: Program | None, big: str, mesh) -> str:
    h = (prog.hints if prog else {}) or {}
    ideas = []
    rows = _replicated_batch(prog, mesh)
    if rows is not None:
        d = batch_devices(mesh)
        ideas.append(f"a batch the mesh can split: its {rows} rows do not divide the {d} batch devices, so every "
                     f"chip runs all of them (make {h.get('chunks', 'the batch')} a multiple of {d})")
    if big in ("arguments", "outputs"):
        ideas.append(f"more FSDP (fsdp axis is {mesh.shape['fsdp']}; a larger slice or mesh.fsdp=-1)")
        if "frozen_dtype" in h:
            ideas.append(f"bf16 frozen weights ({h['frozen_dtype']}=bfloat16)")
    else:
        if "remat" in h:
            ideas.append(f"a remat policy ({h['remat']}=full or dots)")
        if "chunks" in h:
            ideas.append(f"fewer sequences per chip (raise {h['chunks']})" if h["chunks"] in
                         ("grad_cache_chunks", "micro_batches", "grpo.mini_batches") else
                         f"fewer sequences per chip (lower {h['chunks']})")
        ideas.append(f"a shorter bucket ({h.get('bucket', '--tokens')})")
    return "; ".join(ideas)


def compile_program(prog: Program, target: Target, mesh, hlo_dir: str | None = None) -> dict:
    """Lower and compile one program; failures are reported in `error`, never raised."""
    import jax

    rep = {"name": prog.name, "fits": False, "bytes_per_chip": None, "hbm_bytes_per_chip": target.chip.hbm_bytes,
           "shapes": prog.shapes, "tokens_per_step": int(prog.tokens_per_step), "flops_per_chip": None,
           "analytic_flops_per_chip": prog.analytic_flops / target.chips, "collectives": {}, "error": None,
           "model_flops_per_chip": (prog.model_flops or prog.analytic_flops) / target.chips}
    t0 = time.perf_counter()
    try:
        with jax.set_mesh(mesh):  # the model takes the mesh's platform path (models.platform)
            compiled = prog.fn.lower(*prog.args).compile()
    except Exception as e:  # noqa: BLE001 - reported, not raised (a failed compile is a finding)
        rep["error"] = f"{type(e).__name__}: {e}"[:4000]
        rep["compile_s"] = round(time.perf_counter() - t0, 1)
        rep["required_bytes_per_chip"] = oom_bytes(rep["error"])
        return rep
    rep["compile_s"] = round(time.perf_counter() - t0, 1)
    mem = compiled.memory_analysis()
    a, o = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    t, al = int(mem.temp_size_in_bytes), int(mem.alias_size_in_bytes)
    rep["bytes_per_chip"] = {"arguments": a, "temporaries": t, "outputs": o, "aliased": al, "total": a + o + t - al}
    rep["fits"] = rep["bytes_per_chip"]["total"] <= target.chip.hbm_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    rep["flops_per_chip"] = float(cost.get("flops", 0.0)) or None
    rep["bytes_accessed_per_chip"] = float(cost.get("bytes accessed", 0.0)) or None
    hlo = compiled.as_text() or ""
    if hlo_dir:
        Path(hlo_dir).mkdir(parents=True, exist_ok=True)
        (Path(hlo_dir) / f"{prog.name}.hlo.txt").write_text(hlo)
    rep["collectives"] = collectives(hlo)
    rep["hlo_has_while_loop"] = " while(" in hlo
    rep.update(_estimates(rep, target))
    return rep


def _estimates(rep: dict, target: Target) -> dict:
    out = {"flops_note": None, "estimated_step_s": None, "estimated_mfu": None}
    comp, ana = rep["flops_per_chip"], rep["analytic_flops_per_chip"]
    if comp and ana and abs(comp - ana) > 0.1 * ana:
        loops = rep.get("hlo_has_while_loop")
        out["flops_note"] = (f"compiler {comp:.3g} vs analytic {ana:.3g} FLOPs per chip ({comp / ana:.2f}x)"
                             + ("; the compiler's cost analysis counts a while-loop body once, not per iteration "
                                "(layer scan, GradCache / micro-batch loops, decode loop)" if loops else ""))
    chip = target.chip
    if chip.peak_flops and ana:
        flops = max(comp or 0.0, ana)
        t = flops / chip.peak_flops
        if rep.get("bytes_accessed_per_chip") and chip.hbm_bandwidth:
            t = max(t, rep["bytes_accessed_per_chip"] / chip.hbm_bandwidth)
        out["estimated_step_s"] = t
        model = rep.get("model_flops_per_chip") or ana
        out["estimated_mfu"] = model / chip.peak_flops / t
    return out


def select_programs(kind: str, cfg, only=None) -> dict[str, Callable]:
    """The run's programs, or the named subset of them: one program of a large run (the 8B GRPO
    update alone compiles for many minutes) can be re-planned without compiling its siblings."""
    builds = programs_for(kind, cfg)
    unknown = [n for n in only or () if n not in builds]
    if unknown:
        raise UserError(f"--programs: {', '.join(unknown)} not a program of this {kind} run "
                        f"(its programs: {', '.join(builds)})")
    return {n: b for n, b in builds.items() if not only or n in only}


def plan(config: str, topology: str, *, slices: int | None = None, mesh: str | None = None, tokens: int | None = None,
         overrides=(), progress: Callable[[str], None] | None = None, hlo_dir: str | None = None,
         only=None) -> dict:
    """Build and compile every program of a run (or those named in `only`) for a target; returns
    the JSON report.

    `slices` None: the config's mesh.slices. `mesh` "D,F,T" (default the config's mesh) is one
    slice's mesh, as mesh.data/fsdp/tensor are; the slices stack along data."""
    import jax

    if tokens is not None and tokens < 1:
        raise UserError(f"--tokens must be >= 1, got {tokens}")
    kind, cfg = load_run_config(config, overrides)
    mesh_cfg = parse_mesh(mesh) if mesh else cfg.mesh
    target = resolve_target(topology, mesh_cfg.slices if slices is None else slices)
    m = build_mesh(mesh_cfg, target)
    report = {"topology": topology, "libtpu_topology": target.libtpu_name, "platform": target.platform,
              "chip": target.chip.kind, "chips": target.chips, "hosts": target.hosts, "slices": target.slices,
              "mesh": dict(m.shape), "config": str(config), "overrides": list(overrides), "kind": kind, "tokens": tokens,
              "jax": jax.__version__, "libtpu": _libtpu_version(), "programs": []}
    for name, build in select_programs(kind, cfg, only).items():
        t0 = time.perf_counter()
        try:
            prog = build(cfg, m, tokens)
        except ValueError:
            raise  # bad config input: named by the builder
        except Exception as e:  # noqa: BLE001 - a program that cannot be traced is reported too
            rep = {"name": name, "fits": False, "bytes_per_chip": None, "hbm_bytes_per_chip": target.chip.hbm_bytes,
                   "tokens_per_step": None, "flops_per_chip": None, "analytic_flops_per_chip": None,
                   "collectives": {}, "error": f"{type(e).__name__}: {e}"[:4000]}
            rep["verdict"] = _verdict(rep, None, target, m)
            report["programs"].append(rep)
            continue
        if progress:
            progress(f"compiling {prog.name} for {target.chips} {target.chip.kind} chips ...")
        rep = compile_program(prog, target, m, hlo_dir)
        rep["build_s"] = round(time.perf_counter() - t0 - rep["compile_s"], 1)
        rep["verdict"] = _verdict(rep, prog, target, m)
        report["programs"].append(rep)
        if progress:
            progress(format_program(rep))
    report["fits"] = all(p["fits"] for p in report["programs"])
    return report


def _libtpu_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return None


def parse_mesh(text: str):
    from .sharding import MeshConfig

    return MeshConfig.parse(text)


# ------------------------------------------------------------------ text report and CLI
def format_program(p: dict) -> str:
    lines = [f"[{p['name']}] {p['verdict']}"]
    if p.get("shapes"):
        lines.append("  shapes: " + ", ".join(f"{k}={v}" for k, v in p["shapes"].items())
                     + f"; tokens_per_step={p['tokens_per_step']}")
    b = p.get("bytes_per_chip")
    if b:
        lines.append("  per chip: " + ", ".join(f"{k} {_gib(v)}" for k, v in b.items())
                     + f"; HBM {_gib(p['hbm_bytes_per_chip'])}; fits={p['fits']}")
    if p.get("flops_per_chip") or p.get("analytic_flops_per_chip"):
        comp = p.get("flops_per_chip")
        lines.append(f"  FLOPs per chip: compiler {comp or 0:.3g}, analytic {p['analytic_flops_per_chip'] or 0:.3g}")
    if p.get("flops_note"):
        lines.append(f"  note: {p['flops_note']}")
    if p.get("estimated_step_s"):
        lines.append(f"  estimate (roofline lower bound, not a measurement): step >= {p['estimated_step_s']:.3g}s, "
                     f"MFU <= {100 * p['estimated_mfu']:.0f}%")
    for kind, c in sorted(p.get("collectives", {}).items()):
        lines.append(f"  {kind}: {c['count']} ops, {c['bytes'] / 2**20:.1f} MiB"
                     f" ({c['in_loop_count']} ops / {c['in_loop_bytes'] / 2**20:.1f} MiB inside loops, once per iteration)")
    if p.get("compile_s") is not None:
        lines.append(f"  compile: {p['compile_s']}s")
    if p.get("error"):
        lines.append("  error: " + p["error"].strip().splitlines()[0][:500])
    return "\n".join(lines)


def format_report(rep: dict) -> str:
    lines = [f"plan: {rep['config']} ({rep['kind']}) on {rep['topology']}"
             + (f" = {rep['libtpu_topology']}" if rep.get("libtpu_topology") else "")
             + f": {rep['chips']} {rep['chip']} chips, {rep['hosts']} hosts, {rep['slices']} slice(s), "
               f"mesh {rep['mesh']}; jax {rep['jax']}, libtpu {rep['libtpu']}"]
    lines += ["\n" + format_program(p) for p in rep["programs"]]
    lines.append("\nall programs fit" if rep["fits"] else "\nnot every program fits")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="compile every program of a run for a TPU slice (or cpu:N) and report memory",
                       description="Builds every jitted program a run would compile from abstract shapes (no "
                                   "weights, no data), compiles each for a compile-only TPU topology, and reports "
                                   "per-chip memory, FLOPs, a roofline estimate and collectives. Exit 0 when every "
                                   "program fits, 3 otherwise.")
    p.add_argument("--config", required=True, help="train-embedder, sft-reasoner or train-reasoner config (file or preset)")
    p.add_argument("--topology", required=True, help="v5p:2x4x4, v5p-64, v5e-64, v6e:4x4, cpu:8, ...")
    p.add_argument("--slices", type=int, help="number of slices (multi-slice over DCN; default: the config's mesh.slices)")
    p.add_argument("--mesh", metavar="D,F,T", help="one slice's mesh data,fsdp,tensor (default: the config's mesh)")
    p.add_argument("--tokens", type=int, help="force the padded text length of every program to N")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of text")
    p.add_argument("--hlo-dir", metavar="DIR", help="also write each program's optimized HLO text to DIR")
    p.add_argument("--programs", metavar="NAME,...", help="compile only these programs of the run "
                   "(embedder_train_step, sft_train_step, rollout, reward_embed, grpo_update, judge)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.set_defaults(run=run)


def run(args) -> int:
    topo = args.topology.strip().lower()
    if topo.startswith("cpu:") and "jax" not in sys.modules:  # before jax starts: N host devices
        n = topo.split(":", 1)[1]
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only: never probe for a local TPU
    say = lambda m: print(f"embedrl: {m}", file=sys.stderr, flush=True)  # noqa: E731 - progress on stderr
    rep = plan(args.config, args.topology, slices=args.slices, mesh=args.mesh, tokens=args.tokens,
               overrides=args.overrides, progress=say, hlo_dir=args.hlo_dir,
               only=[n.strip() for n in args.programs.split(",") if n.strip()] if args.programs else None)
    print(json.dumps(rep, indent=2) if args.json else format_report(rep))
    return 0 if rep["fits"] else EXIT_DOES_NOT_FIT
