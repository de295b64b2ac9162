"""A toy retrieval task in which the T-CoT's evidence decides retrieval (for EG-RL runs and tests).

Every pair hides one *key* word among distractors, on both sides::

    query:    "find tiger river"        positive: "photo of tiger lemon"

`words` content words per side (default 2) from a pool of 24; the query and its positive share
exactly the key. A single-vector embedding of the bare text cannot know which word matters,
so retrieval among pairs that reuse the same words is ambiguous -- unless the T-CoT names the
key as evidence (``{"text_keywords": ["tiger"]}``).

- *Embedder data* (``embedder_{train,heldout}.jsonl``): the key sits at a random slot and both
  T-CoTs name it, so an Embedder trained on it learns to trust the evidence (it cannot learn a
  positional shortcut).
- *RL data* (``rl_{train,heldout}.jsonl``): the key is always the first word on both sides, a
  rule the Reasoner can discover and the Embedder was never taught; no T-CoTs.
- *SFT data* (``sft.jsonl``): RL-style prompts with well-formed T-CoTs whose keyword is drawn
  uniformly from the side's words, so a cold-started Reasoner writes the format but names the
  key only 1/`words` of the time. EG-RL's reward is what can teach it the rule.
- ``prompts.json``: short templates for the two text prompts and the judge (merged over the
  packaged ones), so tiny models see short prompts.

Everything is a pure function of the arguments; files are written to a local staging folder and
published whole (`fsutil.staged_dir`: a rename locally, upload + commit marker for an object-store
`out_dir`); the returned paths are local files (for an object store, of a local copy).
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from ..fsutil import as_path, is_published, is_remote, local_copy, staged_dir

__all__ = ["WORDS", "ToyRLConfig", "make_toy_keywords", "tcot_for", "QUERY_PREFIX", "POSITIVE_PREFIX"]


@dataclasses.dataclass(frozen=True)
class ToyRLConfig:
    """The toy task's set-up (`toy.reasoner.prepare`): a toy Embedder and an SFT cold start,
    built under WORKDIR/toy on first use and reused afterwards."""

    words: int = 2  # content words per side; the cold-started Reasoner names the key 1/words of the time
    embedder_steps: int = 120
    embedder_lr: float = 3e-3
    embedder_batch: int = 32
    sft_steps: int = 300
    sft_lr: float = 3e-3
    sft_batch: int = 32

WORDS = ("apple", "tiger", "river", "stone", "cloud", "horse", "lemon", "piano", "rocket", "candle",
         "forest", "bridge", "castle", "garden", "violin", "turtle", "pepper", "island", "dragon",
         "mirror", "anchor", "comet", "falcon", "meadow")
QUERY_PREFIX = "find"
POSITIVE_PREFIX = "photo of"
VERSION = 1

PROMPTS = {
    "templates": {
        "query_text": "Name the key word of this search.\n{task}",
        "positive_text": "Name the key word of this item.\n{task}",
        "judge": "Query: {query}\nReasoning: {reasoning}\nCandidates:\n{candidates}\nBest candidate number:",
    }
}


def tcot_for(words, keyword: str) -> str:
    """The toy T-CoT: the words seen, the keyword as evidence, a re-check and the answer."""
    listed = ", ".join(words)
    evidence = json.dumps({"text_keywords": [keyword]})
    return (f"<thinking>The words are {listed}. {evidence}</thinking>"
            f"<rethink>{keyword} is named.</rethink><answer>{keyword}</answer>")


def _sample_pair(rng: np.random.Generator, words: int):
    picks = rng.choice(len(WORDS), size=2 * words - 1, replace=False)
    key = WORDS[picks[0]]
    return key, [WORDS[i] for i in picks[1:words]], [WORDS[i] for i in picks[words:]]


def _texts(key, q_other, p_other, rng, key_first: bool):
    q, p = [key] + q_other, [key] + p_other
    if not key_first:
        q, p = list(rng.permutation(q)), list(rng.permutation(p))
    return q, p


def make_toy_keywords(out_dir, *, seed: int = 0, words: int = 2, embedder_pairs: int = 4096, rl_pairs: int = 2048,
                      sft_samples: int = 2048, heldout_pairs: int = 256) -> dict:
    """Write the toy task under `out_dir` (reused when it exists with the same arguments);
    returns the manifest with absolute file paths."""
    out = os.fspath(out_dir) if is_remote(out_dir) else os.path.abspath(os.fspath(out_dir))
    if not 2 <= words <= (len(WORDS) + 1) // 2:
        raise ValueError(f"words per side must be in [2, {(len(WORDS) + 1) // 2}], got {words}")
    args = dict(version=VERSION, seed=seed, words=words, embedder_pairs=embedder_pairs, rl_pairs=rl_pairs,
                sft_samples=sft_samples, heldout_pairs=heldout_pairs)
    manifest_file = as_path(out) / "manifest.json"
    if manifest_file.exists():
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("args") != args:
            raise ValueError(f"{out} holds a toy keyword task built with {manifest.get('args')}, not {args}")
        if is_published(out):  # else a torn upload (object store) of this very task: rebuilt below
            return _absolute(out)

    rng = np.random.default_rng([seed, 7])
    files: dict[str, list[dict]] = {}

    def pairs(n, key_first, with_cot):
        rows = []
        for _ in range(n):
            key, qo, po = _sample_pair(rng, words)
            q, p = _texts(key, qo, po, rng, key_first)
            row = {"qry": f"{QUERY_PREFIX} {' '.join(q)}", "pos_text": f"{POSITIVE_PREFIX} {' '.join(p)}", "key": key}
            if with_cot:
                row["query_cot"], row["pos_cot"] = tcot_for(q, key), tcot_for(p, key)
            rows.append(row)
        return rows

    files["embedder_train"] = pairs(embedder_pairs, key_first=False, with_cot=True)
    files["embedder_heldout"] = pairs(heldout_pairs, key_first=False, with_cot=True)
    files["rl_train"] = pairs(rl_pairs, key_first=True, with_cot=False)
    files["rl_heldout"] = pairs(heldout_pairs, key_first=True, with_cot=False)
    sft = []
    for i in range(sft_samples):
        key, qo, po = _sample_pair(rng, words)
        q, p = _texts(key, qo, po, rng, key_first=True)
        side, side_words, prefix = ("query", q, QUERY_PREFIX) if i % 2 == 0 else ("positive", p, POSITIVE_PREFIX)
        task = f"{prefix} {' '.join(side_words)}"
        kind = f"{side}_text"
        prompt = PROMPTS["templates"][kind].replace("{task}", task)
        sft.append({"prompt": prompt, "completion": tcot_for(side_words, side_words[int(rng.integers(words))])})
    files["sft"] = sft

    with staged_dir(out) as tmp:
        for name, rows in files.items():
            (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp / "prompts.json").write_text(json.dumps(PROMPTS, indent=2))
        manifest = {"args": args, "files": {name: f"{name}.jsonl" for name in files}, "prompts": "prompts.json",
                    "words": list(WORDS)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return _absolute(out)


def _absolute(out: str) -> dict:
    """The manifest at `out` with absolute local paths (of a local copy for an object store)."""
    root = local_copy(out)
    manifest = json.loads((root / "manifest.json").read_text())
    m = dict(manifest)
    m["files"] = {k: os.fspath(root / v) for k, v in manifest["files"].items()}
    m["prompts"] = os.fspath(root / manifest["prompts"])
    m["dir"] = os.fspath(root)
    return m
