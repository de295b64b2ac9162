"""Homogeneous sub-batch mixture sampling and the grain pipeline (method ref. §6.3, §6.4).

:class:`MixtureSampler` maps a training ``step`` to that step's global batch: a list of
``sub_batches_per_batch`` sub-batches ``(dataset_index, record_indices)``, each of
``sub_batch_size`` records from **one** dataset (in-batch negatives stay same-task).

Pure scheme (no iterator state; everything is a function of the sampler's fields and ``step``):

1. **Dataset choices.** Steps are grouped in blocks of :data:`BLOCK_STEPS`. Block ``b`` draws a
   ``(BLOCK_STEPS, k, 2)`` array of uniforms from ``numpy.random.default_rng([seed, 0x5EED, b])``.
   Sub-batch ``j`` of a step picks dataset ``i`` with probability ∝ ``weight_i × size_i`` (from the
   first uniform, by inverse CDF). If it is a video dataset and the step already has
   ``max_video_sub_batches`` video sub-batches, it is redrawn among the image datasets (second
   uniform, same ∝ rule). Datasets smaller than one sub-batch, or of weight 0, are never chosen.
2. **Positions.** The ``n``-th sub-batch ever drawn from dataset ``i`` (counting steps in order and
   sub-batches in order within a step) is number ``n % m_i`` of epoch ``n // m_i`` of that dataset,
   with ``m_i = size_i // sub_batch_size`` (the incomplete tail of each epoch is dropped). ``n`` needs
   the choices of all earlier steps; they are replayed block by block and the per-block running
   counts are memoised on the sampler, so ``batch_indices(step)`` costs O(BLOCK_STEPS) the first
   time a block is reached and O(1) amortised for sequential steps. The memo is a cache only:
   two equal samplers (or a fresh process) give identical answers.
3. **Records.** Epoch ``e`` of dataset ``i`` walks ``default_rng([seed + e, i]).permutation(size_i)``
   (reshuffled per epoch with seed ``seed + epoch``; the dataset index is mixed in so equally sized
   datasets do not share an order). Sub-batch ``r`` takes ``perm[r*B : (r+1)*B]``. So within an
   epoch of a dataset no record repeats.

Multi-host: :func:`host_slice` gives process ``p`` of ``P`` the contiguous ``B/P`` share of every
sub-batch; :func:`pair_dataset` builds the per-host ``grain.MapDataset`` over steps and
:func:`pair_iterator` its checkpointable iterator (``get_state()`` is ``{"next_index": step}``
JSON; ``set_state`` resumes exactly).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

__all__ = ["MixtureSampler", "host_slice", "pair_dataset", "pair_iterator", "EMBED_RL_WEIGHTS", "BLOCK_STEPS"]

BLOCK_STEPS = 1024
_UNBOUNDED_STEPS = 2**62

# Method ref. §6.4: Embedder mixture weights (identical for 2B and 4B). Sampling is ∝ weight × size.
EMBED_RL_WEIGHTS: dict[str, float] = {
    **{f"llavahound_caption_retrieval_{i}": 5.27 for i in range(1, 6)},
    **{f"llavahound_qa_{i}": 4.38 for i in range(1, 6)},
    **{f"llavahound_video_retrieval_{i}": 5.76 for i in range(1, 6)},
    **{f"visrag_samples_{i}": 6.0 for i in (1, 2)},
    **{f"vidore_samples_{i}": 5.0 for i in (1, 2)},
    "MSCOCO": 3.78, "VisDial": 3.75, "VisualNews_t2i": 3.49, "VisualNews_i2t": 2.91,
    "MSCOCO_i2t": 2.58, "MSCOCO_t2i": 2.32, "ImageNet_1K": 2.25, "Visual7W": 1.68, "DocVQA": 0.84,
    "CIRR": 0.43, "ChartQA": 0.35, "InfographicsVQA": 0.31, "A-OKVQA": 0.26, "OK-VQA": 0.25,
    "NIGHTS": 0.23, "WebQA": 0.23, "SUN397": 0.22,
}


class _Memo:
    """Per-sampler cache of per-block running counts (and recent block choices). Thread-safe,
    picklable (the lock is recreated)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.block_start_counts: list[np.ndarray] = []  # counts before block b, shape (D,)
        self.choices: dict[int, np.ndarray] = {}  # small LRU of block -> (BLOCK_STEPS, k) choices

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


@lru_cache(maxsize=64)
def _permutation(size: int, seed: int, dataset: int) -> np.ndarray:
    perm = np.random.default_rng([seed, dataset]).permutation(size)
    perm.setflags(write=False)
    return perm


@dataclass(frozen=True)
class MixtureSampler:
    """Deterministic homogeneous sub-batch sampler over a mixture of datasets (see module doc).

    ``sizes``/``weights``/``is_video`` have one entry per dataset (the dataset index is the
    position). ``max_video_sub_batches=None`` removes the video cap. ``seed`` must be >= 0.
    """

    sizes: tuple[int, ...]
    weights: tuple[float, ...]
    is_video: tuple[bool, ...]
    sub_batch_size: int
    sub_batches_per_batch: int = 1
    max_video_sub_batches: int | None = 1
    seed: int = 0
    _memo: _Memo = field(default=None, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self):
        sizes = tuple(int(s) for s in self.sizes)
        weights = tuple(float(w) for w in self.weights)
        is_video = tuple(bool(v) for v in self.is_video)
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "is_video", is_video)
        object.__setattr__(self, "_memo", _Memo())
        d = len(sizes)
        if d == 0 or len(weights) != d or len(is_video) != d:
            raise ValueError(f"sizes, weights and is_video need one entry per dataset; got lengths "
                             f"{len(sizes)}, {len(weights)}, {len(is_video)}")
        if any(s < 0 for s in sizes) or any(not np.isfinite(w) or w < 0 for w in weights):
            raise ValueError("sizes must be >= 0 and weights finite and >= 0")
        if self.sub_batch_size < 1 or self.sub_batches_per_batch < 1:
            raise ValueError("sub_batch_size and sub_batches_per_batch must be >= 1")
        if self.max_video_sub_batches is not None and self.max_video_sub_batches < 0:
            raise ValueError("max_video_sub_batches must be >= 0 or None")
        if int(self.seed) < 0:
            raise ValueError("seed must be >= 0")
        p = self._mass(np.ones(d, bool))
        if p.sum() <= 0:
            raise ValueError(f"no dataset can fill a sub-batch of {self.sub_batch_size} with weight > 0 "
                             f"(sizes={sizes}, weights={weights})")
        cap = self.max_video_sub_batches
        if cap is not None and self.sub_batches_per_batch > cap:
            if self._mass(~np.asarray(is_video, bool)).sum() <= 0 and self._mass(np.asarray(is_video)).sum() > 0:
                raise ValueError(f"{self.sub_batches_per_batch} sub-batches per batch with at most {cap} video "
                                 "sub-batches needs an eligible image dataset, and there is none")

    # ---- construction helpers ------------------------------------------------------------
    @classmethod
    def from_sources(cls, sources: Sequence[Any], weights: Sequence[float], is_video: Sequence[bool],
                     sub_batch_size: int, **kwargs) -> "MixtureSampler":
        """Sizes from ``len(source)`` for each source."""
        return cls(tuple(len(s) for s in sources), tuple(weights), tuple(is_video), sub_batch_size, **kwargs)

    # ---- derived quantities ---------------------------------------------------------------
    @property
    def num_datasets(self) -> int:
        return len(self.sizes)

    @property
    def batch_size(self) -> int:
        """Global pairs per step (``sub_batch_size * sub_batches_per_batch``)."""
        return self.sub_batch_size * self.sub_batches_per_batch

    @property
    def steps_per_epoch(self) -> int:
        """Nominal steps in one pass over all data: ``sum(sizes) // batch_size`` (the official
        sampler's epoch length; individual datasets wrap at their own pace)."""
        return sum(self.sizes) // self.batch_size

    def sub_batches_per_epoch(self, dataset: int) -> int:
        return self.sizes[dataset] // self.sub_batch_size

    def probabilities(self) -> np.ndarray:
        """Per-draw dataset probabilities before the video cap (∝ weight × size, eligible only)."""
        p = self._mass(np.ones(self.num_datasets, bool))
        return p / p.sum()

    def _mass(self, mask: np.ndarray) -> np.ndarray:
        sizes = np.asarray(self.sizes, np.float64)
        eligible = (sizes >= self.sub_batch_size) & np.asarray(mask, bool)
        return np.where(eligible, np.asarray(self.weights, np.float64) * sizes, 0.0)

    # ---- the pure schedule ----------------------------------------------------------------
    def _block_choices(self, block: int) -> np.ndarray:
        memo = self._memo
        got = memo.choices.get(block)
        if got is not None:
            return got
        k, d = self.sub_batches_per_batch, self.num_datasets
        u = np.random.default_rng([int(self.seed), 0x5EED, block]).random((BLOCK_STEPS, k, 2))
        video = np.asarray(self.is_video, bool)
        p_all = self._mass(np.ones(d, bool))
        p_img = self._mass(~video)
        cdf_all = np.cumsum(p_all) / p_all.sum()
        last_all = int(np.flatnonzero(p_all)[-1])
        has_img = p_img.sum() > 0
        if has_img:
            cdf_img = np.cumsum(p_img) / p_img.sum()
            last_img = int(np.flatnonzero(p_img)[-1])
        cap = self.max_video_sub_batches
        out = np.empty((BLOCK_STEPS, k), np.int32)
        n_video = np.zeros(BLOCK_STEPS, np.int64)
        for j in range(k):
            c = np.minimum(np.searchsorted(cdf_all, u[:, j, 0], side="right"), last_all)
            if cap is not None and has_img:
                over = video[c] & (n_video >= cap)
                if over.any():
                    redraw = np.minimum(np.searchsorted(cdf_img, u[:, j, 1], side="right"), last_img)
                    c = np.where(over, redraw, c)
            n_video += video[c]
            out[:, j] = c
        if len(memo.choices) >= 8:
            memo.choices.pop(next(iter(memo.choices)))
        memo.choices[block] = out
        return out

    def _counts_before_block(self, block: int) -> np.ndarray:
        memo = self._memo
        starts = memo.block_start_counts
        if not starts:
            starts.append(np.zeros(self.num_datasets, np.int64))
        while len(starts) <= block:
            b = len(starts) - 1
            ch = self._block_choices(b)
            starts.append(starts[b] + np.bincount(ch.ravel(), minlength=self.num_datasets))
        return starts[block]

    def datasets_for_step(self, step: int) -> np.ndarray:
        """The dataset index of each sub-batch of ``step`` (shape ``(sub_batches_per_batch,)``)."""
        step = self._check_step(step)
        with self._memo.lock:
            return self._block_choices(step // BLOCK_STEPS)[step % BLOCK_STEPS].copy()

    def sub_batch_positions(self, step: int) -> list[tuple[int, int, int]]:
        """``(dataset, epoch, sub_batch_in_epoch)`` for each sub-batch of ``step``."""
        step = self._check_step(step)
        block, off = divmod(step, BLOCK_STEPS)
        with self._memo.lock:
            counts = self._counts_before_block(block).copy()
            ch = self._block_choices(block)
            counts += np.bincount(ch[:off].ravel(), minlength=self.num_datasets)
            row = ch[off]
        out = []
        for c in row:
            c = int(c)
            n = int(counts[c])
            counts[c] += 1
            m = self.sub_batches_per_epoch(c)
            out.append((c, n // m, n % m))
        return out

    def batch_indices(self, step: int) -> list[tuple[int, np.ndarray]]:
        """``[(dataset_index, record_indices[sub_batch_size]), ...]`` for ``step`` (global batch)."""
        b = self.sub_batch_size
        out = []
        for c, epoch, r in self.sub_batch_positions(step):
            perm = _permutation(self.sizes[c], int(self.seed) + epoch, c)
            out.append((c, np.array(perm[r * b:(r + 1) * b], dtype=np.int64)))
        return out

    @staticmethod
    def _check_step(step) -> int:
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return step


def host_slice(indices: Sequence[tuple[int, np.ndarray]], process_index: int, process_count: int
               ) -> list[tuple[int, np.ndarray]]:
    """Process ``process_index``'s contiguous share of every sub-batch of ``batch_indices(step)``.

    Raises ``ValueError`` if a sub-batch size is not divisible by ``process_count`` or the process
    index is out of range. Concatenating the shares of processes 0..P-1 gives back each sub-batch.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for process_count {process_count}")
    out = []
    for c, idx in indices:
        n = len(idx)
        if n % process_count:
            raise ValueError(f"sub-batch of {n} records (dataset {c}) is not divisible by process_count "
                             f"{process_count}; pick sub_batch_size as a multiple of the host count")
        share = n // process_count
        out.append((c, idx[process_index * share:(process_index + 1) * share]))
    return out


class _StepRecords:
    """step -> this host's PairRecords (picklable, for grain's map)."""

    def __init__(self, sources, sampler: MixtureSampler, process_index: int, process_count: int):
        self.sources, self.sampler = list(sources), sampler
        self.process_index, self.process_count = process_index, process_count

    def __call__(self, step) -> list:
        recs: list = []
        for c, idx in host_slice(self.sampler.batch_indices(int(step)), self.process_index, self.process_count):
            src = self.sources[c]
            getitems = getattr(src, "__getitems__", None)
            if getitems is not None:
                recs.extend(getitems([int(i) for i in idx]))
            else:
                recs.extend(src[int(i)] for i in idx)
        return recs


def pair_dataset(sources: Sequence[Any], sampler: MixtureSampler, *, process_index: int = 0,
                 process_count: int = 1, num_steps: int | None = None, start_step: int = 0):
    """A ``grain.MapDataset`` whose element ``i`` is this host's list of PairRecords for step
    ``start_step + i``: the concatenation, in sub-batch order, of :func:`host_slice` of
    ``sampler.batch_indices(step)`` (``sub_batches_per_batch * sub_batch_size / process_count``
    records). ``sources[i]`` is dataset ``i``'s random-access source (``len`` must equal
    ``sampler.sizes[i]``; lists, :func:`~embedrl_jax.data.tfds_builder.array_record_source`, ...).
    ``num_steps=None`` means unbounded (the trainer stops it).
    """
    import grain  # loaded when an iterator is made: grain costs seconds to import

    if len(sources) != sampler.num_datasets:
        raise ValueError(f"{len(sources)} sources for a sampler over {sampler.num_datasets} datasets")
    for i, (src, n) in enumerate(zip(sources, sampler.sizes)):
        if len(src) != n:
            raise ValueError(f"source {i} has {len(src)} records but the sampler says {n}")
    if sampler.sub_batch_size % process_count or not 0 <= process_index < process_count:
        raise ValueError(f"sub_batch_size {sampler.sub_batch_size} must be divisible by process_count "
                         f"{process_count}, and 0 <= process_index ({process_index}) < process_count")
    stop = _UNBOUNDED_STEPS if num_steps is None else start_step + int(num_steps)
    return grain.MapDataset.range(int(start_step), stop).map(
        _StepRecords(sources, sampler, process_index, process_count))


def pair_iterator(sources: Sequence[Any], sampler: MixtureSampler, *, process_index: int = 0,
                  process_count: int = 1, num_steps: int | None = None, start_step: int = 0,
                  read_options=None):
    """The checkpointable ``grain.DatasetIterator`` over :func:`pair_dataset`.

    ``it.get_state()`` is a small JSON-able dict (``{"next_index": n}``); save it per process and
    ``set_state`` it on a fresh iterator to resume exactly. ``read_options`` defaults to
    ``grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)``.
    """
    import grain

    ds = pair_dataset(sources, sampler, process_index=process_index, process_count=process_count,
                      num_steps=num_steps, start_step=start_step)
    if read_options is None:
        read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)
    return iter(ds.to_iter_dataset(read_options))
