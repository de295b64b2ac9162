"""`embedrl <verb> ...`: the command line.

Each verb is one function that adds its sub-parser (and sets `run`), registered in
`VERBS`. The modules that load jax are imported inside the verbs (the one exception to
imports at module top), so flags that must be set before jax starts (XLA_FLAGS,
JAX_PLATFORMS) can still be set here or in the environment.

User errors (`errors.UserError`: an unknown config key, a bad value, a bad record; a missing
file; refusing to overwrite) end with one line `embedrl: error: ...` on stderr and exit status
2; anything else is a bug and keeps its traceback. Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable

from .config import apply_overrides, load_config, to_dict
from .errors import MissingFileError, UserError

PROG = "embedrl"
DTYPES = ("float32", "bfloat16")


def _say(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


class _Timer:
    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        self.t0 = time.perf_counter()
        _say(f"{self.what} ...")
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            _say(f"{self.what}: done in {time.perf_counter() - self.t0:.1f}s")


def _mesh_arg(text: str):
    from .sharding import MeshConfig

    return MeshConfig.parse(text)


def _make_mesh(text: str | None):
    if text is None:
        return None  # one device
    from .sharding import make_mesh

    return make_mesh(_mesh_arg(text))


def _existing_dir(path: str, flag: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise MissingFileError(f"{flag} {path}: no such directory")
    return p


def _free_out(path: str, overwrite: bool) -> Path:
    p = Path(path)
    if p.exists() and (not p.is_dir() or any(p.iterdir())) and not overwrite:
        raise UserError(f"--out {path} exists and is not empty (pass --overwrite to replace it)")
    return p


def _model_config(path: Path, flag: str) -> None:
    """A directory's config.json names a model we support, else a user error naming it."""
    from .hf import read_hf_config

    try:
        read_hf_config(path)
    except ValueError as e:  # from Qwen3VLConfig.from_hf_dict: the config names another model
        raise UserError(f"{flag} {path}: {e}") from None


def _source_dtype(hf_dir: Path) -> str:
    """The one dtype of the safetensors in `hf_dir` if it is float32 or bfloat16, else float32."""
    from .safetensors_io import CheckpointReader

    reader = CheckpointReader(hf_dir)
    names = {reader.info(k)[0].name for k in reader.keys()}
    if len(names) == 1 and next(iter(names)) in DTYPES:
        return next(iter(names))
    if names:
        _say(f"source tensors have dtypes {sorted(names)}; converting to float32")
    return "float32"


# ------------------------------------------------------------------------ convert
def convert_hf_to_orbax(args) -> int:
    from .checkpoint import save_handle
    from .hf import load_hf

    hf_dir = _existing_dir(args.hf, "--hf")
    out = _free_out(args.out, args.overwrite)
    _model_config(hf_dir, "--hf")
    dtype = _source_dtype(hf_dir) if args.dtype == "auto" else args.dtype
    mesh = _make_mesh(args.mesh)
    with _Timer(f"loading {hf_dir} as {dtype}"):
        handle = load_hf(hf_dir, dtype=dtype, mesh=mesh)
    _say(f"mesh {dict(handle.mesh.shape)}, {_count(handle.params):,} parameters")
    with _Timer(f"writing orbax checkpoint {out}"):
        save_handle(out, handle, overwrite=args.overwrite)
    return 0


def convert_orbax_to_hf(args) -> int:
    from .checkpoint import load_orbax
    from .hf import save_hf

    ckpt = _existing_dir(args.ckpt, "--ckpt")
    out = _free_out(args.out, args.overwrite)
    _model_config(ckpt, "--ckpt")
    mesh = _make_mesh(args.mesh)
    with _Timer(f"restoring {ckpt}"):
        handle = load_orbax(ckpt, mesh=mesh)
    _say(f"mesh {dict(handle.mesh.shape)}, {_count(handle.params):,} parameters, dtype {handle.dtype}")
    with _Timer(f"writing HF safetensors {out}" + (f" as {args.dtype}" if args.dtype else "")):
        extra = {"dtype": args.dtype} if args.dtype else None
        save_hf(handle, out, max_shard_bytes=args.max_shard_size, dtype=_np_dtype(args.dtype),
                overwrite=args.overwrite, extra_config=extra)
    return 0


def _np_dtype(name):
    if name is None:
        return None
    from .hf import np_dtype

    return np_dtype(name)


def _count(params) -> int:
    import jax

    return sum(int(x.size) for x in jax.tree.leaves(params))


def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert checkpoints between Hugging Face and orbax",
                       description="Convert checkpoints between Hugging Face safetensors and orbax.")
    conv = p.add_subparsers(dest="direction", required=True, metavar="{hf-to-orbax,orbax-to-hf}")

    a = conv.add_parser("hf-to-orbax", help="HF directory (config.json + safetensors) -> orbax checkpoint")
    a.add_argument("--hf", required=True, metavar="DIR", help="HF model directory")
    a.add_argument("--out", required=True, metavar="DIR", help="orbax checkpoint directory to create")
    a.add_argument("--dtype", choices=("auto",) + DTYPES, default="auto",
                   help="parameter dtype (default: the dtype of the source tensors)")
    a.add_argument("--mesh", metavar="D,F,T", help="mesh sizes data,fsdp,tensor, one may be -1 (default: one device)")
    a.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    a.set_defaults(run=convert_hf_to_orbax)

    b = conv.add_parser("orbax-to-hf", help="orbax checkpoint -> HF directory loadable by transformers")
    b.add_argument("--ckpt", required=True, metavar="DIR", help="orbax checkpoint directory")
    b.add_argument("--out", required=True, metavar="DIR", help="HF directory to create")
    b.add_argument("--max-shard-size", type=int, default=5 * 2**30, metavar="BYTES",
                   help="split safetensors above this size, with an index (default: 5 GiB)")
    b.add_argument("--dtype", choices=DTYPES, default=None, help="tensor dtype (default: the stored dtype)")
    b.add_argument("--mesh", metavar="D,F,T", help="mesh to restore onto (default: one device)")
    b.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    b.set_defaults(run=convert_orbax_to_hf)


# ------------------------------------------------------------------------ selfcheck
def run_selfcheck(args) -> int:
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # a CPU-only machine still gets a real 8-device mesh (no effect on accelerators)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    from .selfcheck import run

    if args.hf is not None:
        _existing_dir(args.hf, "--hf")
    report = run(args.workdir, hf=args.hf, mesh=_make_mesh(args.mesh), tol=args.tol)
    return 0 if report["ok"] else 1


def add_selfcheck(sub) -> None:
    p = sub.add_parser("selfcheck", help="convert HF<->orbax and check logits against transformers",
                       description="Round-trip a Qwen3-VL checkpoint through orbax and check JAX logits against "
                                   "transformers (tiny random model by default, fully offline).")
    p.add_argument("--workdir", default="runs/selfcheck", metavar="DIR", help="where to write (default: runs/selfcheck)")
    p.add_argument("--hf", metavar="DIR", help="a real HF Qwen3-VL directory (default: a tiny random model)")
    p.add_argument("--mesh", metavar="D,F,T", help="mesh for the sharded check (default: all devices on fsdp)")
    p.add_argument("--tol", type=float, default=1e-4, help="max |logit difference| allowed (default 1e-4)")
    p.set_defaults(run=run_selfcheck)


# ------------------------------------------------------------------------ train verbs
def _train_config(args, cls):
    """The verb's config: file or preset, then --steps / --seed / --no-export, then dotted overrides; echoed."""
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.no_export:
        overrides.append("export=false")
    cfg = apply_overrides(load_config(args.config, cls), overrides)
    _say(f"config: {json.dumps(to_dict(cfg))}")
    return cfg


def _say_last(last: dict) -> None:
    _say("last step: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in last.items()))


def _train(args, trainer, cfg) -> int:
    """The run every train verb ends with: train (resuming), then export to WORKDIR/export."""
    where = f" and exporting to {trainer.export_dir}" if cfg.export else ""
    with _Timer(f"training to step {trainer.total_steps()}{where}"):
        last = trainer.run()
    if last:
        _say_last(last)
    else:
        _say(f"{args.workdir} is already trained to step {trainer.total_steps()}")
    return 0


def run_train_embedder(args) -> int:
    from .train.embedder import EmbedderTrainConfig, EmbedderTrainer

    cfg = _train_config(args, EmbedderTrainConfig)
    with _Timer("building model, data and the jitted step"):
        trainer = EmbedderTrainer(cfg, args.workdir)
    if any(trainer.skipped.values()):
        _say(f"skipped bad records: {trainer.skipped}")
    return _train(args, trainer, cfg)


def run_train_reasoner(args) -> int:
    from .sharding import make_mesh
    from .toy.reasoner import prepare
    from .train.reasoner import ReasonerRLConfig, ReasonerRLTrainer

    cfg = _train_config(args, ReasonerRLConfig)
    mesh = make_mesh(cfg.mesh)
    if cfg.toy is not None:
        with _Timer(f"toy task set-up under {Path(args.workdir) / 'toy'} (toy Embedder, SFT cold start)"):
            cfg = prepare(cfg, args.workdir, mesh=mesh)
    with _Timer("building policy, reference, Embedder, judge, data and the jitted update"):
        trainer = ReasonerRLTrainer(cfg, args.workdir, mesh=mesh)
    if any(trainer.skipped.values()):
        _say(f"skipped bad records: {trainer.skipped}")
    return _train(args, trainer, cfg)


def run_sft_reasoner(args) -> int:
    from .train.sft import SFTConfig, SFTTrainer

    cfg = _train_config(args, SFTConfig)
    with _Timer("building model, data and the jitted step"):
        trainer = SFTTrainer(cfg, args.workdir)
    _say(f"data: {trainer.report}")
    for example in trainer.report.examples:
        _say(f"skipped: {example}")
    return _train(args, trainer, cfg)


def _add_train_args(p, default_config, what):
    p.add_argument("--config", default=default_config, help=f"JSON config file or preset name (default {default_config})")
    p.add_argument("--workdir", required=True, metavar="DIR", help="checkpoints, metrics.jsonl and exports go here; "
                   "an existing run in DIR is resumed")
    p.add_argument("--steps", type=int, help="train until this step")
    p.add_argument("--seed", type=int, help="random seed (data order, adapters, dropout)")
    p.add_argument("--no-export", action="store_true", help=f"skip writing the {what} to WORKDIR/export")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. optim.lr=1e-4")


def add_train_embedder(sub) -> None:
    p = sub.add_parser("train-embedder", help="contrastive (InfoNCE) training of the Embedder",
                       description="LoRA contrastive training of the Embedder with GradCache InfoNCE on one mesh.")
    _add_train_args(p, "configs/toy_embedder.json", "merged HF Embedder")
    p.set_defaults(run=run_train_embedder)


def add_train_reasoner(sub):
    p = sub.add_parser("train-reasoner", help="EG-RL: GRPO training of the Reasoner with Embedder rewards",
                       description="GRPO on the Reasoner with rewards from the frozen Embedder (and a judge), one mesh.")
    _add_train_args(p, "configs/toy_reasoner_rl.json", "trained Reasoner")
    p.set_defaults(run=run_train_reasoner)


def add_sft_reasoner(sub) -> None:
    p = sub.add_parser("sft-reasoner", help="supervised cold start of the Reasoner on given T-CoTs",
                       description="Supervised fine-tuning (token-mean NLL of the completions) of the Reasoner on "
                                   "prompt -> T-CoT samples; exports the HF model to WORKDIR/export.")
    _add_train_args(p, "configs/sft_reasoner_example.json", "cold-started Reasoner")
    p.set_defaults(run=run_sft_reasoner)


def add_plan(sub) -> None:
    """`embedrl plan` (issue 12) lives in plan.py."""
    from .plan import add_parser

    add_parser(sub)


def add_serve(sub) -> None:
    from .serve.cli import add_parser  # the serve verb lives in embedrl_jax/serve (no jax at import)

    add_parser(sub)


# verb -> function adding its sub-parser; each sub-parser sets `run(args) -> int`
VERBS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "convert": add_convert,
    "selfcheck": add_selfcheck,
    "train-embedder": add_train_embedder,
    "sft-reasoner": add_sft_reasoner,
    "train-reasoner": add_train_reasoner,
    "plan": add_plan,
    "serve": add_serve,
}
# corpus inference and evaluation verbs live in their own modules (eval branch)
from .eval.cli import add_eval  # noqa: E402
from .infer import add_encode, add_search, add_tcot  # noqa: E402

VERBS.update({"tcot": add_tcot, "encode": add_encode, "search": add_search, "eval": add_eval})
from .toy.demo import add_demo  # noqa: E402

VERBS["demo"] = add_demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Embed-RL in JAX: reasoning-driven multimodal embeddings.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--distributed", action="store_true",
                        help="multi-host run: join it first (TPU pods, SLURM, Open MPI detected; see launch/)")
    parser.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                        help="with --distributed where the cluster is not auto-detected: process 0's address")
    parser.add_argument("--num-processes", type=int, default=None, help="with --coordinator: how many processes")
    parser.add_argument("--process-id", type=int, default=None, help="with --coordinator: this process's index")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="{" + ",".join(VERBS) + "}")
    for add in VERBS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format=f"{PROG}: %(message)s")
    try:
        if args.distributed:
            from .distributed import initialize

            initialize(args)
        return int(args.run(args) or 0)
    except (UserError, FileNotFoundError, FileExistsError) as e:  # a missing file or a refused overwrite too
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
