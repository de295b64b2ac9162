"""Training checkpoints: one orbax CheckpointManager holding the train state and the data
iterator state, restored through sharded abstract targets so a run resumes exactly (and
onto another mesh shape if need be).

Damage: orbax publishes a step only once it is complete (a temporary directory renamed into
place on POSIX, a commit_success.txt marker on object stores), so a run killed during an async
save leaves a temporary directory that is removed here and never listed. A listed step that
cannot be read is moved aside to `damaged-<step>-<time>` with a warning naming it, and the
previous step is used; that is why `keep_checkpoints` is at least 2.
"""
from __future__ import annotations

import logging
import time

import jax
import orbax.checkpoint as ocp

from ..fsutil import as_path, sync_processes

log = logging.getLogger(__name__)


class TrainCheckpointer:
    def __init__(self, directory, *, max_to_keep: int = 3, save_interval_steps: int = 1, async_save: bool = True):
        self.directory = as_path(directory, absolute=True)
        self.options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True,
        )
        self.manager = self._manager()

    def _manager(self):
        return ocp.CheckpointManager(self.directory, options=self.options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
        return self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
            force=force,
        )

    def restore(self, step: int, abstract_state):
        """abstract_state: ShapeDtypeStructs carrying the target NamedShardings."""
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return out["state"], out["data"]

    def restore_latest(self, state_shapes, state_shardings):
        """(state, data state) of the newest readable checkpoint, restored into its shards, or
        (None, None) when there is none. Unreadable steps are moved aside, with a warning."""
        target = abstract_like(state_shapes, state_shardings)
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                out = self.restore(step, target)
            except Exception as e:  # noqa: BLE001 - any read failure means: not usable, try the previous one
                path = self.directory / str(step)
                damaged.append(step)
                log.warning("checkpoint %s is incomplete or unreadable (%s: %s); trying the previous one",
                            path, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
                continue
            if damaged:
                log.warning("resuming from checkpoint %s (step %d) instead of damaged step(s) %s",
                            self.directory / str(step), step, damaged)
                self._set_aside(damaged)
            return out
        if damaged:
            self._set_aside(damaged)
            log.warning("no readable checkpoint in %s: starting from step 0", self.directory)
        return None, None

    def _set_aside(self, steps):
        """Rename damaged steps out of orbax's view (later saves must not be refused as <= them)."""
        self.manager.close()
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%dT%H%M%S")
            for step in steps:
                src = self.directory / str(step)
                if src.exists():
                    src.rename(self.directory / f"damaged-{step}-{stamp}")
        sync_processes("embedrl_checkpoint_set_aside")
        self.manager = self._manager()

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
