"""The EG-RL toy run's set-up, composed from the ordinary trainers: the toy keyword task's files,
a toy base, a toy Embedder (train-embedder) and a cold-started Reasoner (sft-reasoner), built
under WORKDIR/toy on first use and reused afterwards. `embedrl train-reasoner` calls `prepare`
when the config has `toy`; the GRPO trainer itself knows nothing of it.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from ..data.records import read_mmeb
from ..data.toy_rl import make_toy_keywords, tcot_for
from ..fsutil import primary_first, replace_dir, sync_processes, write_text_atomic
from ..models.qwen3_vl.inputs import Buckets
from ..prompts import load_prompts
from ..train.embedder import DataConfig, EmbedderTrainConfig, EmbedderTrainer
from ..train.reasoner import ReasonerRLConfig
from ..train.sft import SFTConfig, SFTDataConfig, run_sft
from ..train.state import OptimConfig
from .base import build_tiny_base

__all__ = ["prepare"]


def prepare(cfg: ReasonerRLConfig, workdir, *, mesh=None) -> ReasonerRLConfig:
    """`cfg` with policy, embedder and data set to the toy task's (built if missing); collective:
    every host of a multi-host run calls it."""
    if cfg.toy is None:
        return cfg
    toy, root = cfg.toy, Path(workdir) / "toy"
    base = root / "base"

    def files():  # process 0 writes them; every other host then reads them
        manifest = make_toy_keywords(root / "data", seed=cfg.seed, words=toy.words)
        if not (base / "config.json").exists():
            corpus = []
            for path in manifest["files"].values():
                for line in Path(path).read_text().splitlines():
                    corpus += [v for v in json.loads(line).values() if isinstance(v, str)]
            corpus += list(load_prompts(manifest["prompts"])["templates"].values()) + [cfg.embed_inputs.suffix]
            build_tiny_base(base, seed=cfg.seed, corpus=corpus)
        return manifest

    manifest = primary_first(files, "embedrl_toy_rl_files")
    embedder = root / "embedder"
    if not (embedder / "config.json").exists():
        _train_toy_embedder(cfg, root, base, manifest, embedder, mesh)
    reasoner = root / "reasoner"
    if not (reasoner / "config.json").exists():
        scfg = SFTConfig(model=str(base), data=SFTDataConfig(files=(manifest["files"]["sft"],)), lora=None,
                         optim=OptimConfig(lr=toy.sft_lr, schedule="cosine", warmup_steps=10, weight_decay=0.0),
                         mesh=cfg.mesh, batch_size=toy.sft_batch, max_completion_tokens=cfg.rollout.max_new_tokens,
                         steps=toy.sft_steps, seed=cfg.seed, compute_dtype="float32",
                         checkpoint_every=toy.sft_steps, buckets=cfg.buckets)
        out = run_sft(scfg, root / "sft_run", mesh=mesh)
        if jax.process_index() == 0:
            replace_dir(out, reasoner)
        sync_processes("embedrl_toy_reasoner")
    data = dataclasses.replace(cfg.data, files=(manifest["files"]["rl_train"],), prompts=manifest["prompts"])
    return dataclasses.replace(cfg, policy=str(reasoner), embedder=str(embedder), data=data, toy=None)


def _train_toy_embedder(cfg: ReasonerRLConfig, root: Path, base: Path, manifest, out: Path, mesh):
    toy = cfg.toy
    ecfg = EmbedderTrainConfig(
        model=str(base), lora=None,
        optim=OptimConfig(lr=toy.embedder_lr, schedule="cosine", warmup_steps=10, weight_decay=0.01),
        data=DataConfig(toy=False, mmeb=(manifest["files"]["embedder_train"],), sub_batch_size=toy.embedder_batch),
        inputs=cfg.embed_inputs, mesh=cfg.mesh, buckets=Buckets(seq_min=64, patch_min=64, rows_min=1),
        steps=toy.embedder_steps, seed=cfg.seed, compute_dtype="float32", checkpoint_every=toy.embedder_steps,
        async_checkpoints=False, export=False,
    )
    trainer = EmbedderTrainer(ecfg, root / "embedder_run", mesh=mesh)
    trainer.run(progress=False)
    # how much the evidence matters to this Embedder: held-out Hit@1 by T-CoT quality
    recs = read_mmeb(manifest["files"]["embedder_heldout"])[0][:128]
    rng = np.random.default_rng(cfg.seed)

    def wrong(item):
        words = item["text"].split()[-toy.words:]
        return dict(item, tcot=tcot_for(words, words[int(rng.integers(toy.words))]))

    report = {}
    for name, f in (("evidence_correct", lambda it: it), ("evidence_random", wrong),
                    ("no_tcot", lambda it: {k: v for k, v in it.items() if k != "tcot"})):
        q = trainer.embed_items([f(r.query) for r in recs])
        p = trainer.embed_items([f(r.positive) for r in recs])
        report[name] = float(np.mean(np.argmax(q @ p.T, axis=1) == np.arange(len(recs))))
    report["chance"] = 1.0 / len(recs)
    trainer.export(out, overwrite=True)
    if jax.process_index() == 0:
        write_text_atomic(root / "embedder_eval.json", json.dumps(report, indent=2))
