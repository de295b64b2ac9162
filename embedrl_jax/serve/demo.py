"""Tiny random Embedder / Reasoner directories for trying the server offline (tests, benchmark).

    python -m embedrl_jax.serve.demo DIR       # writes DIR/embedder, DIR/reasoner, DIR/prompts.json
    embedrl serve --embedder DIR/embedder --reasoner DIR/reasoner $(cat DIR/overrides.txt)

The models are random (vectors and T-CoTs mean nothing); the point is the plumbing.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..prompts import GENERATION_KINDS

__all__ = ["write_tiny_models", "TINY_OVERRIDES", "TINY_INPUT"]

#: small pixel budgets for the tiny models (merged tokens per image / frame)
TINY_INPUT = dict(image_min_tokens=4, image_max_tokens=16, frame_min_tokens=4, frame_max_tokens=8)
#: a small shape plan for the tiny models (as `key=value` overrides)
TINY_OVERRIDES = [
    "input.image_min_tokens=4", "input.image_max_tokens=16", "input.frame_min_tokens=4", "input.frame_max_tokens=8",
    "max_seq_len=128", "seq_buckets=[128]", "max_batch_tokens=512", "max_batch_items=4", "max_frames=2",
    "reason.max_new_tokens=12", "reason.max_prompt_tokens=128", "reason.seq_buckets=[128]",
    "reason.max_batch_items=2", "reason.max_frames=1",
]


def write_tiny_models(root, *, reasoner: bool = True) -> dict[str, Path]:
    """DIR/embedder (tiny Qwen3-VL + tokenizer with <emb>), DIR/reasoner, DIR/prompts.json (short
    prompts, so tiny prompts stay short); existing directories are reused."""
    from ..testing import image_processor, tiny_hf_model, tiny_tokenizer

    root = Path(root)
    out = {"embedder": root / "embedder", "prompts": root / "prompts.json"}
    if not (out["embedder"] / "config.json").exists():
        tiny_hf_model(seed=0).save_pretrained(out["embedder"])
        tok = tiny_tokenizer()
        tok.add_tokens(["<emb>"])
        tok.save_pretrained(out["embedder"])
        image_processor().save_pretrained(out["embedder"])
    if reasoner:
        out["reasoner"] = root / "reasoner"
        if not (out["reasoner"] / "config.json").exists():
            tiny_hf_model(seed=4).save_pretrained(out["reasoner"])
            tiny_tokenizer().save_pretrained(out["reasoner"])
            image_processor().save_pretrained(out["reasoner"])
    prompts = {"templates": {k: f"Reason ({k}) about: {{task}}" for k in GENERATION_KINDS}}
    out["prompts"].write_text(json.dumps(prompts))
    (root / "overrides.txt").write_text(" ".join(TINY_OVERRIDES + [f"reason.prompts={out['prompts']}"]) + "\n")
    return out


if __name__ == "__main__":
    paths = write_tiny_models(sys.argv[1] if len(sys.argv) > 1 else "runs/serve-demo")
    print(json.dumps({k: str(v) for k, v in paths.items()}))
