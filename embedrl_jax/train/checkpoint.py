"""Training checkpoints: one orbax CheckpointManager holding the train state and the data
iterator state, restored through sharded abstract targets so a run resumes exactly (and
onto another mesh shape if need be)."""
from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class TrainCheckpointer:
    def __init__(self, directory, *, max_to_keep: int = 3, save_interval_steps: int = 1, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save, create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

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
        """(state, data state) of the latest checkpoint, restored into its shards, or (None, None)."""
        latest = self.latest_step()
        if latest is None:
            return None, None
        return self.restore(latest, abstract_like(state_shapes, state_shardings))

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
