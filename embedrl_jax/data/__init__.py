"""Training data for the Embedder: records, readers, TFDS array_record storage, toy set, sampler.

Importing this package is cheap (numpy only): PIL, grain and tensorflow_datasets load on first use.

- :mod:`.records`: :class:`PairRecord`, :func:`read_mmeb`, :func:`read_llavahound`, :func:`load_image`.
- :mod:`.tfds_builder`: :func:`write_array_record`, :func:`array_record_source` (no TensorFlow).
- :mod:`.toy`: :func:`make_toy_retrieval` (offline images, shape scenes, moving-shape clips).
- :mod:`.pipeline`: :class:`MixtureSampler`, :func:`host_slice`, :func:`pair_dataset`,
  :func:`pair_iterator`.
"""
from .pipeline import BLOCK_STEPS, EMBED_RL_WEIGHTS, MixtureSampler, host_slice, pair_dataset, pair_iterator
from .records import PairRecord, RecordError, SkipReport, load_image, read_llavahound, read_mmeb, video_task
from .tfds_builder import ArrayRecordPairSource, array_record_source, dataset_dir, write_array_record
from .toy import load_toy_manifest, make_toy_retrieval

__all__ = [
    "PairRecord", "RecordError", "SkipReport", "load_image", "read_mmeb", "read_llavahound", "video_task",
    "write_array_record", "array_record_source", "ArrayRecordPairSource", "dataset_dir",
    "make_toy_retrieval", "load_toy_manifest",
    "MixtureSampler", "host_slice", "pair_dataset", "pair_iterator", "EMBED_RL_WEIGHTS", "BLOCK_STEPS",
]
