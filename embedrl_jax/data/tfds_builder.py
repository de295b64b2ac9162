"""PairRecords as a TFDS ``array_record`` dataset, written and read without TensorFlow.

Layout: ``{data_dir}/pair_records/{name}/{version}/`` holds ``dataset_info.json``,
``features.json`` and one ``pair_records-{split}.array_record-*`` shard set per split. Each example
is ``{"json": Text}``: the record's :meth:`PairRecord.to_json` (media are paths, so records are
small). Shuffling is disabled, so example ``i`` of a split is the ``i``-th record written to it.

- :func:`write_array_record` builds the dataset with ``download_and_prepare`` from records passed
  to the builder's constructor (nothing is downloaded).
- :func:`array_record_source` opens it as a random-access source (``len``, ``__getitem__`` ->
  :class:`PairRecord`, ``__getitems__``) that ``grain.MapDataset.source`` accepts.

Only ``tfds.core`` builder/data-source code runs; ``tf.data`` is never touched, so this works in a
venv without TensorFlow (the tests check ``import tensorflow`` fails there).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Iterable, Mapping, Sequence

from .records import PairRecord

__all__ = ["PairRecordBuilder", "write_array_record", "array_record_source", "ArrayRecordPairSource",
           "dataset_dir"]

BUILDER_NAME = "pair_records"


def _tfds():
    import tensorflow_datasets as tfds

    return tfds


def _builder_class():
    # Defined lazily so importing embedrl_jax.data does not import tensorflow_datasets.
    global _BUILDER_CLS
    if _BUILDER_CLS is not None:
        return _BUILDER_CLS
    tfds = _tfds()

    class PairRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Stores PairRecords supplied as ``records={split: [PairRecord, ...]}`` (no download)."""

        name = BUILDER_NAME
        VERSION = tfds.core.Version("1.0.0")

        # The builder has no code folder (no checksums file, no metadata files): returning None
        # also sidesteps tfds' `code_path`, which needs the optional `importlib_resources` for
        # classes living in an installed package.
        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            return None

        def __init__(self, *, records: Mapping[str, Sequence[PairRecord]] | None = None, **kwargs):
            self._records = records
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="Embed-RL (query, positive) pairs as JSON (embedrl_jax.data.PairRecord).",
                features=tfds.features.FeaturesDict({"json": tfds.features.Text()}),
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            if self._records is None:
                raise ValueError("PairRecordBuilder needs records=... to generate the dataset")
            return {split: self._generate_examples(recs) for split, recs in self._records.items()}

        def _generate_examples(self, recs):
            for i, rec in enumerate(recs):
                yield i, {"json": rec.to_json()}

    _BUILDER_CLS = PairRecordBuilder
    return PairRecordBuilder


_BUILDER_CLS = None


def __getattr__(name):
    if name == "PairRecordBuilder":
        return _builder_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dataset_dir(data_dir, name: str, version: str | None = None) -> str:
    """``{data_dir}/pair_records/{name}/{version}``; with ``version=None`` the newest one present."""
    root = os.path.join(os.fspath(data_dir), BUILDER_NAME, name)
    if version is not None:
        return os.path.join(root, str(version))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no pair-record dataset {name!r} under {data_dir} (looked for {root})")
    tfds = _tfds()
    versions = []
    for d in os.listdir(root):
        try:
            versions.append((tfds.core.Version(d), d))
        except ValueError:
            continue  # incomplete.* and other folders
    if not versions:
        raise FileNotFoundError(f"pair-record dataset {name!r} under {data_dir} has no complete version")
    return os.path.join(root, max(versions)[1])


def write_array_record(records: Iterable[PairRecord] | Mapping[str, Iterable[PairRecord]], data_dir, name: str,
                       version: str = "1.0.0", *, split: str = "train", overwrite: bool = False) -> str:
    """Write records as the TFDS array_record dataset ``name`` and return its version folder.

    ``records`` is an iterable of :class:`PairRecord` (written to ``split``) or a mapping
    ``{split_name: records}`` (for example one split per dataset name, e.g. ``"A-OKVQA"``). Media must be paths. TFDS writes into an
    ``incomplete.*`` folder and renames it, so a crash leaves no half-written version. An existing
    version raises ``FileExistsError`` unless ``overwrite=True``.
    """
    tfds = _tfds()
    if isinstance(records, Mapping):
        splits = {str(k): list(v) for k, v in records.items()}
    else:
        splits = {split: list(records)}
    for s, recs in splits.items():
        for i, r in enumerate(recs):
            if not isinstance(r, PairRecord):
                raise TypeError(f"split {s!r} item {i} is a {type(r).__name__}, not a PairRecord")
    out = dataset_dir(data_dir, name, version)
    if os.path.exists(out):
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite=True to rebuild it")
        shutil.rmtree(out)
    cls = _builder_class()
    config = tfds.core.BuilderConfig(name=name, version=version)
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(_quiet_custom_config)
    try:
        builder = cls(records=splits, data_dir=os.fspath(data_dir), config=config, file_format="array_record")
        with tempfile.TemporaryDirectory(prefix="pair_records_dl_") as dl:
            builder.download_and_prepare(
                download_dir=dl,
                download_config=tfds.download.DownloadConfig(try_download_gcs=False),
            )
    finally:
        absl_logger.removeFilter(_quiet_custom_config)
    return os.fspath(builder.data_dir)


def _quiet_custom_config(record: logging.LogRecord) -> bool:
    # Every dataset name is a custom BuilderConfig by design; tfds warns about each one.
    return not str(record.msg).startswith("Using custom data configuration")


class ArrayRecordPairSource:
    """Random-access PairRecords from one split (``len``, ``[i]``, ``__getitems__``); picklable."""

    def __init__(self, path: str, split: str = "train"):
        self.path, self.split = path, split
        self._source = None
        self._open()

    def _open(self):
        tfds = _tfds()
        builder = tfds.builder_from_directory(self.path)
        if self.split not in builder.info.splits:
            raise KeyError(f"split {self.split!r} not in {self.path}; available: {sorted(builder.info.splits)}")
        self._source = builder.as_data_source(split=self.split)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> PairRecord:
        n = len(self._source)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"record index {index} out of range for {n} records")
        return PairRecord.from_json(self._source[index]["json"])

    def __getitems__(self, indices: Sequence[int]) -> list[PairRecord]:
        rows = self._source.__getitems__([int(i) for i in indices])
        return [PairRecord.from_json(r["json"]) for r in rows]

    def __getstate__(self):
        return {"path": self.path, "split": self.split}

    def __setstate__(self, state):
        self.path, self.split, self._source = state["path"], state["split"], None
        self._open()

    def __repr__(self) -> str:
        return f"ArrayRecordPairSource(path={self.path!r}, split={self.split!r}, len={len(self)})"


def array_record_source(data_dir, name: str, split: str = "train", version: str | None = None
                        ) -> ArrayRecordPairSource:
    """Open ``name`` (newest version unless given) under ``data_dir`` as a random-access source of
    :class:`PairRecord` for ``grain.MapDataset.source``."""
    return ArrayRecordPairSource(dataset_dir(data_dir, name, version), split)
