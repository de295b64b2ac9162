"""The model side of the server: the static-shape plan, warm-up, item preparation, batch runs.

Everything that touches jax runs in the server's one worker thread (`run_embed`,
`run_reason`, `warmup`); `prepare` (tokenising, image decoding and resizing) runs in the
preparation thread, serialised by a lock because fast tokenizers are not re-entrant.

An embed batch is the items' one-item `Embedder.prepare` batches merged (left-padded as the
builder pads), packed by `pack_inputs` to a planned (S, rows x row_len) and padded to a planned
batch size B by repeating its first row; the padding rows' outputs are dropped. The forward is
the Embedder's own jitted function, so a vector equals `Embedder.encode`'s up to float noise.
Reasoning batches go through `pack_prompts` with a planned shape and the Reasoner's jitted
sampler, as `Reasoner.generate` runs it.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from concurrent.futures import Future
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..data.inputs import InputConfig
from ..hf import batch_shardings
from ..models.qwen3_vl.inputs import pack_inputs
from ..prompts import load_prompts, reasoner_prompt
from ..reason.reasoner import GENERATE_INPUTS, _decode
from ..reason.sampler import jitted_generate
from ..reason.sequences import pack_prompts
from ..sharding import to_host
from .config import ServeConfig
from .schema import APIError, load_item

__all__ = ["Plan", "Job", "Engine", "reasoner_input_config", "matryoshka"]

log = logging.getLogger("embedrl.serve")


def _powers(lo: int, hi: int, growth: int) -> list[int]:
    """growth**k from the smallest >= lo up to the smallest >= hi (both ends covered)."""
    out, x = [], 1
    while x < lo:
        x *= growth
    out.append(x)
    while x < hi:
        x *= growth
        out.append(x)
    return out


def _seq_buckets(explicit: Sequence[int], top: int, low: int = 128) -> tuple[int, ...]:
    if explicit:
        return tuple(sorted(set(int(s) for s in explicit)))
    out, s = [], low
    while s < top:
        out.append(s)
        s *= 2
    return tuple(out + [top])


def reasoner_input_config(cfg: InputConfig) -> InputConfig:
    """The Reasoner's input config: its generate-mode layout with the served pixel budgets."""
    return dataclasses.replace(GENERATE_INPUTS, image_min_tokens=cfg.image_min_tokens,
                               image_max_tokens=cfg.image_max_tokens, frame_min_tokens=cfg.frame_min_tokens,
                               frame_max_tokens=cfg.frame_max_tokens, num_frames=cfg.num_frames,
                               video_fps=cfg.video_fps)


def matryoshka(vecs: np.ndarray, dim: int | None) -> np.ndarray:
    """First `dim` dimensions, re-normalised (as `Embedder.encode(dim=...)`)."""
    if dim is None:
        return vecs
    v = vecs[..., :dim]
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The shapes one stage can run: (B, S, rows) with rows = 0 for a text-only batch."""

    seqs: tuple[int, ...]
    max_items: int
    max_tokens: int
    max_frames: int
    row_len: int  # patches per vision row (a multiple of the merge unit)
    growth: int = 2

    def batch_sizes(self, seq: int) -> list[int]:
        """Powers of `growth` below the top, and the top: the most items of this length a batch takes."""
        top = max(1, min(self.max_items, self.max_tokens // seq))
        return [b for b in _powers(1, top, self.growth) if b < top] + [top]

    def capacity(self, seq: int) -> int:
        return self.batch_sizes(seq)[-1]

    def rows_options(self, b: int) -> list[int]:
        return _powers(b, b * self.max_frames, self.growth)

    def shapes(self) -> list[tuple[int, int, int]]:
        out = []
        for s in self.seqs:
            for b in self.batch_sizes(s):
                out.append((b, s, 0))
                out += [(b, s, r) for r in self.rows_options(b)]
        return out

    def seq_for(self, length: int) -> int | None:
        for s in self.seqs:
            if s >= length:
                return s
        return None

    def fit(self, n_items: int, seq: int, frames: Sequence[int]) -> tuple[int, int]:
        """(B, rows) for n items of padded length `seq` with these vision segments (in pack order)."""
        b = next(x for x in self.batch_sizes(seq) if x >= n_items)
        if not frames:
            return b, 0
        rows, offset = 1, 0
        for n in frames:
            if offset + n > self.row_len:
                rows, offset = rows + 1, 0
            offset += n
        r = next((x for x in self.rows_options(b) if x >= rows), None)
        if r is None:
            raise RuntimeError(f"{rows} patch rows do not fit the plan for batch {b}")
        return b, r


@dataclasses.dataclass(eq=False)
class Job:
    """One item on its way through the queue (reason stage, then embed stage, or embed only)."""

    stage: str  # "reason" | "embed"
    kind: str  # "text" | "image" | "video": batches are homogeneous in it
    length: int  # real tokens
    seq: int  # planned padded length
    batch: dict  # the one-item transformers-named batch
    future: Future
    item: dict | None = None  # the loaded item (reason stage: to embed with its T-CoT)
    param: str = ""
    tcot: str | None = None
    reason_tokens: int = 0
    t_enqueue: float = 0.0

    @property
    def key(self) -> tuple:
        return (self.stage, self.kind, self.seq)


def _segments(batch: Mapping) -> list[int]:
    """Patch counts of the vision segments, in `pack_inputs`' order (images, then video groups)."""
    out = []
    for name in ("image_grid_thw", "video_grid_thw"):
        g = batch.get(name)
        if g is not None:
            for t, h, w in np.asarray(g).reshape(-1, 3):
                out += [int(h * w)] * int(t)
    return out


def _kind(batch: Mapping) -> str:
    if batch.get("video_grid_thw") is not None:
        return "video"
    return "image" if batch.get("image_grid_thw") is not None else "text"


def merge_batches(batches: Sequence[Mapping[str, np.ndarray]], pad_id: int) -> dict[str, np.ndarray]:
    """One-item batches -> one left-padded batch, as `InputBuilder.build` makes for the list."""
    length = max(b["input_ids"].shape[1] for b in batches)
    out = {}
    for name, fill in (("input_ids", pad_id), ("attention_mask", 0), ("mm_token_type_ids", 0)):
        out[name] = np.concatenate([np.pad(np.asarray(b[name]), ((0, 0), (length - b[name].shape[1], 0)),
                                           constant_values=fill) for b in batches])
    for pix, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        have = [b for b in batches if b.get(grid) is not None]
        if have:
            out[pix] = np.concatenate([b[pix] for b in have]).astype(np.float32)
            out[grid] = np.concatenate([b[grid] for b in have]).astype(np.int64)
    return out


def pad_rows(arrays: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Pad the batch axis to `rows` by repeating the first row (valid inputs; outputs dropped)."""
    out = dict(arrays)
    b = arrays["input_ids"].shape[0]
    if rows <= b:
        return out
    for name in ("input_ids", "attention_mask", "visual_index"):
        a = arrays[name]
        out[name] = np.concatenate([a, np.repeat(a[:1], rows - b, axis=0)])
    p = arrays["positions"]
    out["positions"] = np.concatenate([p, np.repeat(p[:, :1], rows - b, axis=1)], axis=1)
    return out


_ITEM_RE = re.compile(r"^item \d+: ")


def _api_error(err: Exception, param: str) -> APIError:
    msg = _ITEM_RE.sub("", str(err))
    m = re.match(r"field '([^']+)': (.*)$", msg, re.S)
    if m:
        return APIError(400, f"{param}.{m.group(1)}: {m.group(2)}", param=f"{param}.{m.group(1)}", code="invalid_value")
    return APIError(400, f"{param}: {msg}", param=param, code="invalid_value")


class Engine:
    """Embedder (+ Reasoner) with the served config's shape plan."""

    def __init__(self, embedder, reasoner=None, cfg: ServeConfig = ServeConfig(), *, model_name: str = "embedrl",
                 allow_local_files: str | None = None):
        import threading

        self.embedder = embedder
        self.reasoner = reasoner
        self.cfg = cfg
        self.model_name = model_name
        self.allow_local_files = allow_local_files
        self.prep_lock = threading.Lock()
        self.handle = embedder.handle
        mcfg = self.handle.model_config
        unit = mcfg.vision.merge_unit
        tokens = max(cfg.input.image_max_tokens, cfg.input.frame_max_tokens)
        row_len = int(math.ceil(tokens * unit / unit) * unit)
        self.embed_plan = Plan(_seq_buckets(cfg.seq_buckets, cfg.max_seq_len), cfg.max_batch_items,
                               cfg.max_batch_tokens, cfg.max_frames, row_len, cfg.batch_growth)
        self.reason_plan = None
        self.prompts = None
        if reasoner is not None:
            rc = cfg.reason
            self.reason_plan = Plan(_seq_buckets(rc.seq_buckets, rc.max_prompt_tokens), rc.max_batch_items,
                                    rc.max_batch_items * rc.max_prompt_tokens, rc.max_frames, row_len,
                                    cfg.batch_growth)
            self.prompts = load_prompts(rc.prompts)
            self._generate = jitted_generate(reasoner.handle.model_def, rc.max_new_tokens, reasoner.eos_ids,
                                             rc.temperature, rc.top_k, rc.top_p)
        self.warmed = {"embed": 0, "reason": 0}

    @property
    def dim(self) -> int:
        return self.embedder.dim

    def plan(self, stage: str) -> Plan:
        return self.embed_plan if stage == "embed" else self.reason_plan

    def capacity(self, stage: str, seq: int) -> int:
        return self.plan(stage).capacity(seq)

    # ------------------------------------------------------------------ preparation (prep thread)
    def _check_fits(self, plan: Plan, batch: Mapping, param: str, what: str) -> int:
        length = int(batch["input_ids"].shape[1])
        seq = plan.seq_for(length)
        if seq is None:
            raise APIError(400, f"{param}: {what} is {length} tokens, more than this server's limit of {plan.seqs[-1]} "
                                "(long text is not truncated when input.max_text_tokens is null)", param=param,
                           code="too_many_tokens")
        segs = _segments(batch)
        if len(segs) > plan.max_frames:
            raise APIError(400, f"{param}: {what} has {len(segs)} images / video frame groups, more than this server's "
                                f"limit of {plan.max_frames}", param=param, code="too_many_images")
        if segs and max(segs) > plan.row_len:
            raise APIError(400, f"{param}: an image of {max(segs)} patches exceeds the {plan.row_len}-patch budget",
                           param=param, code="invalid_image")
        return seq

    def prepare(self, item: Mapping, param: str, *, reasoning: bool, side: str) -> Job:
        """A queued Job for one request item (raises APIError 400 naming `param`)."""
        loaded = load_item(item, param, self.allow_local_files)
        with self.prep_lock:
            try:
                ebatch = self.embedder.prepare([loaded])
            except (ValueError, TypeError) as e:
                raise _api_error(e, param) from None
        eseq = self._check_fits(self.embed_plan, ebatch, param, "the item")
        if not reasoning or loaded.get("tcot"):
            return Job("embed", _kind(ebatch), int(ebatch["attention_mask"].sum()), eseq, ebatch, Future(),
                       param=param, tcot=loaded.get("tcot"))
        prompt = reasoner_prompt(loaded, side, self.prompts)
        with self.prep_lock:
            try:
                rbatch = self.reasoner.prepare([prompt])
            except (ValueError, TypeError) as e:
                raise _api_error(e, param) from None
        rseq = self._check_fits(self.reason_plan, rbatch, param, "the Reasoner prompt")
        return Job("reason", _kind(rbatch), int(rbatch["attention_mask"].sum()), rseq, rbatch, Future(),
                   item=loaded, param=param)

    def embed_job_after_reasoning(self, job: Job, tcot: str, reason_tokens: int) -> Job:
        """The embed-stage Job of a reasoned item (worker thread); errors are server-side (500)."""
        item = dict(job.item, tcot=tcot)
        with self.prep_lock:
            try:
                ebatch = self.embedder.prepare([item])
            except (ValueError, TypeError) as e:
                raise APIError(500, f"{job.param}: the item with its T-CoT cannot be embedded: {e}", param=job.param,
                               code="tcot_failed") from None
        try:
            seq = self._check_fits(self.embed_plan, ebatch, job.param, "the item with its T-CoT")
        except APIError as e:
            raise APIError(500, e.message + " (raise max_seq_len / max_frames, or lower reason.max_new_tokens)",
                           param=job.param, code="tcot_too_long") from None
        return Job("embed", _kind(ebatch), int(ebatch["attention_mask"].sum()), seq, ebatch, job.future,
                   param=job.param, tcot=tcot, reason_tokens=reason_tokens)

    # ------------------------------------------------------------------ model calls (worker thread)
    def _embed_arrays(self, arrays: dict) -> np.ndarray:
        handle = self.handle
        shardings = batch_shardings(arrays, handle.mesh)
        packed = {k: jax.device_put(v, shardings[k]) for k, v in arrays.items()}
        with jax.set_mesh(handle.mesh):
            out = self.embedder._embed(handle.params, packed, jnp.int32(self.embedder.emb_token_id),
                                       dtype=handle.dtype)
        return to_host(out).astype(np.float32)

    def run_embed(self, jobs: Sequence[Job]) -> np.ndarray:
        """[len(jobs), D] float32 embeddings of one homogeneous group."""
        seq = jobs[0].seq
        merged = merge_batches([j.batch for j in jobs], self.embedder.builder.pad_id)
        b, rows = self.embed_plan.fit(len(jobs), seq, _segments(merged))
        vision = (rows, self.embed_plan.row_len) if rows else None
        arrays, _ = pack_inputs(self.handle.model_config, **merged, buckets=self.handle.buckets, pad_to=seq,
                                vision=vision)
        return self._embed_arrays(pad_rows(arrays, b))[: len(jobs)]

    def _generate_arrays(self, arrays: dict, deltas: np.ndarray):
        rc, handle = self.cfg.reason, self.reasoner.handle
        key = jax.random.key(rc.seed)
        with jax.set_mesh(handle.mesh):
            toks, _, mask = self._generate(handle.params, arrays, jnp.asarray(deltas, jnp.int32), key)
        return np.array(to_host(toks)), np.array(to_host(mask))

    def run_reason(self, jobs: Sequence[Job]) -> list[tuple[str, int]]:
        """(T-CoT text, reasoner tokens: prompt + generated) per job."""
        seq = jobs[0].seq
        merged = merge_batches([j.batch for j in jobs], self.reasoner.builder.pad_id)
        b, rows = self.reason_plan.fit(len(jobs), seq, _segments(merged))
        vision = (rows, self.reason_plan.row_len) if rows else None
        (arrays,), (deltas,) = pack_prompts(self.reasoner.handle.model_config, [merged], self.reasoner.buckets,
                                            shape=(seq, vision))
        arrays = pad_rows(arrays, b)
        deltas = np.concatenate([deltas, np.repeat(deltas[:1], b - len(deltas))]).astype(np.int32)
        toks, mask = self._generate_arrays(arrays, deltas)
        out = []
        for i, j in enumerate(jobs):
            out.append((_decode(self.reasoner.tokenizer, toks[i][mask[i]]), j.length + int(mask[i].sum())))
        return out

    # ------------------------------------------------------------------ warm-up
    def _dummy(self, model_config, pad_id: int, b: int, seq: int, rows: int, row_len: int, left: bool):
        ids = np.full((b, 1), pad_id, np.int64)
        vision = (rows, row_len) if rows else None
        if left:
            (arrays,), (deltas,) = pack_prompts(model_config, [{"input_ids": ids, "attention_mask": np.ones_like(ids)}],
                                                shape=(seq, vision))
            return arrays, deltas
        arrays, _ = pack_inputs(model_config, ids, np.ones_like(ids), pad_to=seq, vision=vision)
        return arrays, None

    def warmup(self, progress=None) -> dict[str, int]:
        """Run every planned shape once (so jit caches hold them); returns shapes per stage."""
        t0 = time.perf_counter()
        for b, s, r in self.embed_plan.shapes():
            arrays, _ = self._dummy(self.handle.model_config, self.embedder.builder.pad_id, b, s, r,
                                    self.embed_plan.row_len, left=False)
            self._embed_arrays(arrays)
            self.warmed["embed"] += 1
            if progress:
                progress("embed", (b, s, r))
        if self.reasoner is not None:
            for b, s, r in self.reason_plan.shapes():
                arrays, deltas = self._dummy(self.reasoner.handle.model_config, self.reasoner.builder.pad_id, b, s, r,
                                             self.reason_plan.row_len, left=True)
                self._generate_arrays(arrays, deltas)
                self.warmed["reason"] += 1
                if progress:
                    progress("reason", (b, s, r))
        log.info("warm-up: %s shapes in %.1fs", self.warmed, time.perf_counter() - t0)
        return dict(self.warmed)
