"""`embedrl demo --workdir W`: the method end to end on embedded data, composed from the ordinary pieces.

Stages (each in its own folder under W, each finished stage recorded in ``W/<stage>/stage.json``
with the settings it ran with; a rerun reuses finished stages and the trainers resume from their
checkpoints, so an interrupted demo continues where it stopped):

1. ``embedder``  toy Embedder (train-embedder, preset ``toy_embedder``, toy retrieval set) -> export;
2. ``coldstart`` cold-start Reasoner (sft-reasoner, preset ``sft_reasoner_example``: the toy retrieval
   set's T-CoTs) -> export;
3. ``rl``        EG-RL (train-reasoner, preset ``toy_reasoner_rl`` minus its toy set-up): the
   cold-start Reasoner as policy, the toy Embedder frozen as reward model, the toy retrieval set's
   MMEB pair files as RL data -> export;
4. ``evalset``   the toy evaluation set in the official MMEB layouts (eval/toy_set.py);
5. ``eval_plain``, ``eval_coldstart``, ``eval_rl``: ``eval mmeb`` without T-CoT, and with T-CoTs
   written for every query and candidate by the cold-start / the RL Reasoner (infer.generate_tcots,
   kept resumably in ``W/eval_*/tcot``);
6. ``report``    ``W/results.md`` (the three-way table) and ``W/plots/*.png`` (training curves of both
   Reasoner stages and the Embedder, per-task scores of the three variants).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from ..config import apply_overrides, load_config, to_dict
from ..data.sft import toy_sft_files
from ..errors import UserError
from ..fsutil import write_text_atomic

__all__ = ["DemoConfig", "QUICK", "run_demo", "add_demo"]

VARIANTS = (("plain", "no T-CoT"), ("coldstart", "cold-start T-CoT"), ("rl", "EG-RL T-CoT"))


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    embedder_steps: int = 60  # toy Embedder (InfoNCE) steps
    sft_steps: int = 60  # cold-start SFT steps
    rl_steps: int = 10  # EG-RL (GRPO) steps
    rl_pairs: int = 4  # pairs per GRPO step (2 prompts each)
    rl_samples: int = 4  # rollouts per prompt
    max_new_tokens: int = 64  # T-CoT length cap (RL rollouts and evaluation T-CoTs)
    eval_n: int = 12  # queries per task of the toy evaluation set
    tasks: str = ""  # comma-separated task keys ("" = every toy task)
    tcot_batch: int = 32  # T-CoTs generated per batch
    seed: int = 0


# small enough for the slow test: every stage runs, nothing learns much
QUICK = ("embedder_steps=2", "sft_steps=2", "rl_steps=1", "rl_pairs=2", "rl_samples=2", "max_new_tokens=16",
         "eval_n=4", "tasks=VOC2007,MSCOCO_t2i,MSR-VTT")


def _say(msg: str) -> None:
    print(f"embedrl demo: {msg}", file=sys.stderr, flush=True)


class _Stage:
    """A stage's folder and completion record; `done` is true when it finished with the same settings."""

    def __init__(self, workdir: Path, name: str, settings: dict):
        self.dir, self.name, self.settings = workdir / name, name, settings
        self.record = self.dir / "stage.json"

    @property
    def done(self) -> bool:
        if not self.record.exists():
            return False
        rec = json.loads(self.record.read_text())
        if rec.get("settings") != self.settings:
            raise UserError(f"{self.dir} was made with other settings ({rec.get('settings')} != {self.settings}); "
                            "use a new --workdir or delete that folder")
        return True

    def finish(self, seconds: float, cpu_seconds: float = 0.0, **extra) -> None:
        """Record the stage as done: wall seconds, and CPU seconds of all threads (the machine-load-free
        measure: on an idle machine the wall time is about CPU time / the cores the stage keeps busy)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.record, json.dumps({"settings": self.settings, "seconds": round(seconds, 2),
                                                   "cpu_seconds": round(cpu_seconds, 2), **extra}, indent=2))

    def seconds(self, key: str = "seconds") -> float:
        return float(json.loads(self.record.read_text()).get(key, 0.0)) if self.record.exists() else 0.0


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ------------------------------------------------------------------ the configs of the three trainers
def embedder_config(d: DemoConfig):
    from ..train.embedder import EmbedderTrainConfig

    return apply_overrides(load_config("toy_embedder", EmbedderTrainConfig),
                           [f"steps={d.embedder_steps}", f"seed={d.seed}", "export=true",
                            f"checkpoint_every={max(1, d.embedder_steps // 3)}",
                            f"eval_every={max(1, d.embedder_steps // 3)}"])


def sft_config(d: DemoConfig):
    from ..train.sft import SFTConfig

    return apply_overrides(load_config("sft_reasoner_example", SFTConfig),
                           [f"steps={d.sft_steps}", f"seed={d.seed}", "export=true",
                            f"checkpoint_every={max(1, d.sft_steps // 3)}"])


def rl_config(d: DemoConfig, workdir: Path, ecfg, scfg):
    from ..train.reasoner import ReasonerRLConfig

    cfg = load_config("toy_reasoner_rl", ReasonerRLConfig)
    files = tuple(toy_sft_files(workdir / "coldstart"))  # the toy retrieval set's MMEB train files
    cfg = dataclasses.replace(cfg, toy=None, policy=str(workdir / "coldstart" / "export"),
                              embedder=str(workdir / "embedder" / "export"),
                              data=dataclasses.replace(cfg.data, files=files),
                              inputs=scfg.inputs, embed_inputs=ecfg.inputs)
    return apply_overrides(cfg, [f"steps={d.rl_steps}", f"seed={d.seed}", "export=true",
                                 f"checkpoint_every={max(1, d.rl_steps // 2)}",
                                 f"rollout.pairs_per_step={d.rl_pairs}", f"rollout.samples={d.rl_samples}",
                                 f"rollout.max_new_tokens={d.max_new_tokens}"])


# ------------------------------------------------------------------ stages
def _train(stage: _Stage, trainer_cls, cfg, **kw) -> None:
    if stage.done:
        _say(f"{stage.name}: done ({stage.seconds():.0f}s), reusing {stage.dir / 'export'}")
        return
    _say(f"{stage.name}: training {cfg.steps} steps in {stage.dir}")
    t0, c0 = time.perf_counter(), time.process_time()
    trainer = trainer_cls(cfg, stage.dir, **kw)
    trainer.run(progress=False)
    if not (stage.dir / "export" / "config.json").exists():
        trainer.export()
    stage.finish(time.perf_counter() - t0, time.process_time() - c0)
    _say(f"{stage.name}: done in {stage.seconds():.0f}s")


def _evaluate(stage: _Stage, workdir: Path, d: DemoConfig, ecfg, scfg, reasoner_dir: Path | None) -> None:
    if stage.done:
        _say(f"{stage.name}: done ({stage.seconds():.0f}s)")
        return
    from ..embed.embedder import Embedder
    from ..eval.mmeb import evaluate
    from ..infer import _model_tag
    from ..reason.reasoner import Reasoner

    t0, c0 = time.perf_counter(), time.process_time()
    emb_dir = workdir / "embedder" / "export"
    emb = Embedder.from_pretrained(emb_dir, input_config=ecfg.inputs)
    tag = f"{_model_tag(emb_dir)}-i{_digest(to_dict(ecfg.inputs))[:8]}"
    reasoner = None
    kw = {"max_new_tokens": d.max_new_tokens, "temperature": 1.0, "seed": d.seed, "batch_size": d.tcot_batch}
    if reasoner_dir is not None:
        reasoner = Reasoner.from_pretrained(reasoner_dir, input_config=scfg.inputs)
    _say(f"{stage.name}: evaluating on the toy set" + (f" with T-CoTs from {reasoner_dir}" if reasoner_dir else ""))
    out = evaluate(lambda items: emb.encode(items, batch_size=32), workdir / "evalset", stage.dir,
                   tasks=d.tasks or None, model_tag=tag, reasoner=reasoner, reasoner_kw=kw,
                   metadata={"model_name": "toy-embedder", "variant": stage.name, "ndcg_pairing": "correct"},
                   log=lambda m: _say(f"{stage.name}: {m}"))
    stage.finish(time.perf_counter() - t0, time.process_time() - c0, overall=out["summary"]["overall"]["score"])
    _say(f"{stage.name}: overall {out['summary']['overall']['score']:.1f} in {stage.seconds():.0f}s")


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _curve(ax, rows, key, label, **kw):
    pts = [(r["step"], r[key]) for r in rows if key in r and isinstance(r[key], (int, float)) and math.isfinite(r[key])]
    if pts:
        x, y = zip(*pts)
        ax.plot(x, y, label=label, **kw)
    return len(pts)


def _plots(workdir: Path, scores: dict[str, dict[str, float]], tasks: list[str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = workdir / "plots"
    out.mkdir(exist_ok=True)
    paths = []
    emb, sft, rl = (_rows(workdir / s / "metrics.jsonl") for s in ("embedder", "coldstart", "rl"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    _curve(axes[0], emb, "loss", "InfoNCE loss")
    axes[0].set_title("toy Embedder (train-embedder)")
    _curve(axes[1], sft, "loss", "NLL")
    axes[1].set_title("cold-start Reasoner (sft-reasoner)")
    for key, label in (("reward/total", "total"), ("reward/outcome", "outcome"), ("reward/format", "format")):
        _curve(axes[2], rl, key, label, marker="o", markersize=3)
    axes[2].set_title("EG-RL (train-reasoner): mean reward")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "training_curves.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks) + 2), 3.8))
    x = np.arange(len(tasks) + 1)
    width = 0.8 / len(VARIANTS)
    for i, (name, label) in enumerate(VARIANTS):
        vals = [scores[name].get(t, np.nan) for t in tasks] + [scores[name]["All"]]
        ax.bar(x + (i - 1) * width, vals, width, label=label)
    ax.set_xticks(x, tasks + ["All"], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("score (hit@1 / nDCG@5, %)")
    ax.set_title("toy evaluation set: the toy Embedder without and with Reasoner T-CoTs")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    paths.append(out / "task_scores.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


def _report(workdir: Path, d: DemoConfig, stages: dict[str, _Stage], total_s: float) -> dict:
    summaries = {n: json.loads((workdir / f"eval_{n}" / "summary.json").read_text()) for n, _ in VARIANTS}
    tasks = list(summaries["plain"]["tasks"])
    scores = {n: {**s["tasks"], "All": s["overall"]["score"]} for n, s in summaries.items()}
    lines = ["| task | " + " | ".join(label for _, label in VARIANTS) + " |",
             "|---|" + "---|" * len(VARIANTS)]
    for t in tasks + ["All"]:
        cells = []
        for n, _ in VARIANTS:
            v = scores[n].get(t)
            cells.append("–" if v is None else f"{v:.1f}")
        name = f"**{t} (mean over {len(tasks)} tasks)**" if t == "All" else t
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rl_rows = _rows(workdir / "rl" / "metrics.jsonl")
    reward = [r.get("reward/total") for r in rl_rows if "reward/total" in r]
    times = {k: round(s.seconds(), 1) for k, s in stages.items()}
    cpu = {k: round(s.seconds("cpu_seconds"), 1) for k, s in stages.items()}
    plots = _plots(workdir, scores, tasks)
    text = ["# Embed-RL demo (toy models, embedded data)", "",
            f"Settings: `{json.dumps(dataclasses.asdict(d))}`", "",
            "Scores on the toy evaluation set (hit@1 for image/video tasks, nDCG@5 for ViDoSeek-doc; correct "
            "nDCG pairing):", "", *lines, ""]
    if reward:
        text += [f"EG-RL mean total reward: first step {reward[0]:.4f}, last step {reward[-1]:.4f} "
                 f"({len(reward)} steps).", ""]
    text += ["Stage wall times (s): " + ", ".join(f"{k} {v}" for k, v in times.items()) + f"; this run {total_s:.0f}s.",
             "", "Stage CPU times (s, all threads): " + ", ".join(f"{k} {v}" for k, v in cpu.items())
             + f"; total {sum(cpu.values()):.0f}s.",
             "", "Plots: " + ", ".join(str(p.relative_to(workdir)) for p in plots), "",
             f"Exports: Embedder {workdir / 'embedder' / 'export'}, cold-start Reasoner "
             f"{workdir / 'coldstart' / 'export'}, EG-RL Reasoner {workdir / 'rl' / 'export'}", ""]
    write_text_atomic(workdir / "results.md", "\n".join(text))
    out = {"scores": scores, "tasks": tasks, "stage_seconds": times, "stage_cpu_seconds": cpu, "plots": [str(p) for p in plots],
           "rl_reward": reward, "exports": {k: str(workdir / k / "export") for k in ("embedder", "coldstart", "rl")}}
    write_text_atomic(workdir / "results.json", json.dumps(out, indent=2))
    return out


def run_demo(workdir, demo: DemoConfig = DemoConfig()) -> dict:
    """Run (or finish) the demo in `workdir`; returns results.json's content."""
    from ..eval.toy_set import make_toy_eval_set
    from ..sharding import make_mesh
    from ..train.embedder import EmbedderTrainer
    from ..train.reasoner import ReasonerRLTrainer
    from ..train.sft import SFTTrainer

    t_start = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ecfg, scfg = embedder_config(demo), sft_config(demo)
    stages = {
        "embedder": _Stage(workdir, "embedder", to_dict(ecfg)),
        "coldstart": _Stage(workdir, "coldstart", to_dict(scfg)),
    }
    _train(stages["embedder"], EmbedderTrainer, ecfg)
    _train(stages["coldstart"], SFTTrainer, scfg)
    rcfg = rl_config(demo, workdir, ecfg, scfg)
    stages["rl"] = _Stage(workdir, "rl", to_dict(rcfg))
    _train(stages["rl"], ReasonerRLTrainer, rcfg, mesh=make_mesh(rcfg.mesh))
    ev = stages["evalset"] = _Stage(workdir, "evalset", {"n": demo.eval_n, "seed": demo.seed})
    if not ev.done:
        t0, c0 = time.perf_counter(), time.process_time()
        make_toy_eval_set(ev.dir, n=demo.eval_n, seed=demo.seed, overwrite=True)
        ev.finish(time.perf_counter() - t0, time.process_time() - c0)
    common = {"tasks": demo.tasks, "max_new_tokens": demo.max_new_tokens, "seed": demo.seed, "eval_n": demo.eval_n}
    for name, _ in VARIANTS:
        reasoner = None if name == "plain" else workdir / name / "export"
        settings = dict(common, reasoner=None if reasoner is None else _digest(stages[name].settings))
        if name == "plain":
            settings.pop("max_new_tokens")
        st = stages[f"eval_{name}"] = _Stage(workdir, f"eval_{name}", settings)
        _evaluate(st, workdir, demo, ecfg, scfg, reasoner)
    out = _report(workdir, demo, stages, time.perf_counter() - t_start)
    _say(f"results: {workdir / 'results.md'}; plots: {', '.join(out['plots'])}")
    return out


# ------------------------------------------------------------------ CLI
def run(args) -> int:
    overrides = (list(QUICK) if args.quick else []) + list(args.overrides)
    demo = apply_overrides(DemoConfig(), overrides)
    out = run_demo(args.workdir, demo)
    print((Path(args.workdir) / "results.md").read_text())
    return 0 if all(math.isfinite(v) for s in out["scores"].values() for v in s.values()) else 1


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the method end to end on embedded toy data (Embedder, SFT, EG-RL, evaluation)",
                       description="toy Embedder -> cold-start Reasoner -> EG-RL -> T-CoTs for the toy evaluation set "
                                   "-> evaluation without / with cold-start / with RL T-CoTs -> WORKDIR/results.md, "
                                   "WORKDIR/plots/*.png, HF exports. A rerun reuses finished stages.")
    p.add_argument("--workdir", required=True, metavar="DIR")
    p.add_argument("--quick", action="store_true", help="tiny step counts and 3 tasks (a smoke run: " + " ".join(QUICK) + ")")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="demo settings: " + ", ".join(f.name for f in dataclasses.fields(DemoConfig)))
    p.set_defaults(run=run)
