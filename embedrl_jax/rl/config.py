"""Plain configs of the EG-RL pieces: rollouts, the GRPO objective, the RL pair data.

The GRPO trainer (train/reasoner.py) nests them in its config; they hold no logic.
"""
from __future__ import annotations

import dataclasses

__all__ = ["RolloutConfig", "GRPOConfig", "RLDataConfig"]


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    pairs_per_step: int = 32  # B: 2B prompts (both sides) per step
    samples: int = 4  # n completions per prompt (one group)
    max_new_tokens: int = 2048
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_prompt_tokens: int = 14336  # a pair with a longer prompt is dropped (counted)
    # A completion ends at the first of these: its text is cut there and the tokens after it leave
    # the completion mask, so rewards, log-probs and the loss never see text past the answer.
    stop: tuple[str, ...] = ("</answer>",)


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    mini_batches: int = 2  # optimizer steps per rollout batch (prompts split evenly)
    advantage: str = "grpo"  # registry name: grpo | drgrpo
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = 3.0
    kl_coef: float = 0.01  # 0 disables the reference entirely
    kl_estimator: str = "k3"
    aggregation: str = "token-mean"
    policy_loss: str = "ppo_clip"
    logprob_chunk: int = 4096  # vocabulary chunk of the fp32 log-prob scan


@dataclasses.dataclass(frozen=True)
class RLDataConfig:
    files: tuple[str, ...] = ()  # pair files, one dataset each: JSON array or JSONL, MMEB-train or LLaVA-Hound records
    weights: dict[str, float] = dataclasses.field(default_factory=dict)  # dataset name -> weight (default 1)
    prompts: str | None = None  # JSON prompt templates merged over the packaged ones
    skip_bad: bool = False
    # where relative media paths resolve (None: each file's own folder)
    image_root: str | None = None  # MMEB image paths, every file
    frames_root: str | None = None  # LLaVA-Hound frame paths, every file
    image_roots: dict[str, str] = dataclasses.field(default_factory=dict)  # per file (dataset name or path)
    frames_roots: dict[str, str] = dataclasses.field(default_factory=dict)  # per file (dataset name or path)
