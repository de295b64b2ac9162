"""Fault handling pieces on plain arrays: the guarded update, checkpoint fallback, the path layer."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from embedrl_jax.errors import ConfigError, UserError
from embedrl_jax.fsutil import COMMIT_MARKER, as_path, is_published, replace_dir
from embedrl_jax.train.checkpoint import TrainCheckpointer
from embedrl_jax.train.core import TrainerConfig, guard_update
from embedrl_jax.train.metrics import MetricsWriter, read_metrics


def _step_fn(optimizer):
    def step(state, x):
        loss, grads = jax.value_and_grad(lambda p: jnp.sum((p["w"] * x) ** 2))(state["params"])
        updates, opt = optimizer.update(grads, state["opt_state"], state["params"])
        new = dict(state, params=optax.apply_updates(state["params"], updates), opt_state=opt, step=state["step"] + 1)
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return step


def _state(optimizer):
    params = {"w": jnp.arange(3.0)}
    z = jnp.zeros((), jnp.int32)
    return {"step": z, "params": params, "opt_state": optimizer.init(params), "skipped": z, "skipped_in_row": z}


def test_guard_skips_non_finite_steps_and_counts_them():
    opt = optax.adam(0.1)
    upd = jax.jit(guard_update(_step_fn(opt), 1, nan_steps=(3,)))
    s = _state(opt)
    s1, m1 = upd(s, jnp.ones(3))
    assert int(s1["skipped"]) == 0 and np.isfinite(float(m1["loss"]))
    s2, m2 = upd(s1, jnp.full(3, jnp.nan))  # a NaN batch: loss and grads not finite
    assert not np.isfinite(float(m2["loss"]))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), (s2["params"], s2["opt_state"]),
                 (s1["params"], s1["opt_state"]))
    assert (int(s2["step"]), int(s2["skipped"]), int(s2["skipped_in_row"])) == (2, 1, 1)
    s3, m3 = upd(s2, jnp.ones(3))  # step 3: the injected NaN loss (the batch itself is fine)
    assert np.isnan(float(m3["loss"])) and int(s3["skipped_in_row"]) == 2
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), s3["params"], s1["params"])
    s4, _ = upd(s3, jnp.ones(3))
    assert (int(s4["skipped"]), int(s4["skipped_in_row"])) == (2, 0)
    assert not np.array_equal(np.asarray(s4["params"]["w"]), np.asarray(s1["params"]["w"]))


def test_config_validation_names_the_fields():
    with pytest.raises(ConfigError, match="keep_checkpoints must be >= 2"):
        TrainerConfig(keep_checkpoints=1)
    with pytest.raises(ConfigError, match="max_consecutive_skips"):
        TrainerConfig(max_consecutive_skips=0)
    with pytest.raises(ConfigError, match="checkpoint_minutes"):
        TrainerConfig(checkpoint_minutes=-1)


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    state = {"w": jnp.arange(4.0), "step": jnp.zeros((), jnp.int32)}
    shapes = jax.eval_shape(lambda s: s, state)
    sh = jax.tree.map(lambda x: x.sharding, state)
    ck = TrainCheckpointer(tmp_path / "ck", async_save=False)
    ck.save(1, state, {"step": 1})
    ck.save(2, jax.tree.map(lambda x: x + 1, state), {"step": 2})
    ck.close()
    for f in (tmp_path / "ck" / "2" / "state").rglob("*"):  # garble every file of the latest step
        if f.is_file():
            f.write_bytes(b"\x00garbage" * 3)
    ck = TrainCheckpointer(tmp_path / "ck", async_save=False)
    with caplog.at_level(logging.WARNING):
        restored, data = ck.restore_latest(shapes, sh)
    assert data == {"step": 1}
    np.testing.assert_array_equal(restored["w"], np.arange(4.0))
    assert f"{tmp_path / 'ck' / '2'} is incomplete or unreadable" in caplog.text
    assert "instead of damaged step(s) [2]" in caplog.text
    assert ck.latest_step() == 1 and any(p.name.startswith("damaged-2-") for p in (tmp_path / "ck").iterdir())
    assert ck.save(2, state, {"step": 2})  # the damaged step no longer blocks a new save at its number
    ck.close()


def test_metrics_resume_drops_rows_past_the_restored_step(tmp_path):
    w = MetricsWriter(tmp_path / "m.jsonl")
    for i in range(1, 5):
        w.write({"step": i, "loss": float("nan") if i == 2 else 1.0})
    w.close()
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # torn by a kill
    MetricsWriter(tmp_path / "m.jsonl", resume_step=3).close()
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [1, 2, 3]


def test_local_publish_replaces_atomically_and_object_store_says_which_package(tmp_path):
    for text in ("old", "new"):
        tmp = tmp_path / f".out.tmp-{text}"
        tmp.mkdir()
        (tmp / "a.txt").write_text(text)
        replace_dir(tmp, tmp_path / "out")
    assert (tmp_path / "out" / "a.txt").read_text() == "new" and is_published(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # the object-store branch: same code, the missing filesystem package is named
    with pytest.raises(UserError, match="gcsfs"):
        as_path("gs://some-bucket/run")
    with pytest.raises(UserError, match="gcsfs"):
        replace_dir(tmp_path / "out", "gs://some-bucket/run/export")
    with pytest.raises(UserError, match="s3fs"):
        MetricsWriter("s3://some-bucket/run/metrics.jsonl")
    assert COMMIT_MARKER == "commit_success.txt"


def test_wall_clock_checkpoints_fall_due_after_the_configured_minutes():
    import time
    from types import SimpleNamespace

    from embedrl_jax.train.core import Trainer

    def due(minutes, since_s):
        fake = SimpleNamespace(cfg=TrainerConfig(checkpoint_minutes=minutes), process=(0, 1))
        return Trainer._clock_due(fake, time.monotonic() - since_s)

    assert due(1.0, 61) and not due(1.0, 30) and not due(0, 10_000)


def test_object_store_publication_writes_the_commit_marker_last(tmp_path, monkeypatch):
    """The object-store branch of replace_dir, run on a local directory treated as remote (no
    object store here): the old copy loses its marker first, the marker is the last object."""
    import embedrl_jax.fsutil as fsutil

    monkeypatch.setattr(fsutil, "is_remote", lambda path: True)
    order = []
    real_write = fsutil.epath.Path.write_text

    def spy(self, text, *a, **k):
        order.append(self.name)
        return real_write(self, text, *a, **k)

    monkeypatch.setattr(fsutil.epath.Path, "write_text", spy)
    cls = type(fsutil.epath.Path(tmp_path))
    real_copy = cls.copy

    def copy_spy(self, dst, *a, **k):
        order.append(fsutil.epath.Path(dst).name)
        return real_copy(self, dst, *a, **k)

    monkeypatch.setattr(cls, "copy", copy_spy)
    dest = tmp_path / "export"
    for text in ("old", "new"):
        tmp = tmp_path / f".export.tmp-{text}"
        (tmp / "sub").mkdir(parents=True)
        (tmp / "sub" / "w.bin").write_text(text)
        (tmp / "config.json").write_text(text)
        fsutil.replace_dir(tmp, dest)
        assert fsutil.is_published(dest) and not tmp.exists()
    assert (dest / "sub" / "w.bin").read_text() == "new" and (dest / "config.json").read_text() == "new"
    assert sorted(order[:2]) == ["config.json", "w.bin"] and order[2] == fsutil.COMMIT_MARKER  # marker last
    assert sorted(order[3:5]) == ["config.json", "w.bin"] and order[5:] == [fsutil.COMMIT_MARKER]
    (dest / fsutil.COMMIT_MARKER).unlink()  # an interrupted publication: files there, no marker
    assert not fsutil.is_published(dest)
