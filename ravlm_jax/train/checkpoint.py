"""Orbax checkpoints with exact resume.

Each stage of a run keeps its own ``CheckpointManager`` under ``WORKDIR/checkpoints/STAGE``,
saving three items per step: the train state (sharded arrays), the data iterator's state
(JSON) and the resolved config (JSON). Saves are asynchronous; orbax writes into a temporary
directory and commits by rename, so a run killed at any moment leaves the previous
checkpoints intact and a rerun resumes from the newest committed one. A latest checkpoint
that fails to restore (corrupt or truncated files) is reported and the one before it is used.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointRestoreError(RuntimeError):
    pass


class StageCheckpoints:
    def __init__(self, workdir: str | os.PathLike, stage: str, max_to_keep: int = 3,
                 async_save: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints" / stage
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
                enable_async_checkpointing=async_save),
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict | None = None,
             config_json: dict | None = None, force: bool = False) -> None:
        items = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(data_state)
        if config_json is not None:
            items["config"] = ocp.args.JsonSave(config_json)
        self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore_latest(self, abstract_state: Any, with_data: bool = True
                       ) -> tuple[int, Any, dict | None] | None:
        """(step, state, data_state) of the newest checkpoint that restores, or None.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings, so arrays
        come back directly in their sharded layout."""
        for step in reversed(self.steps()):
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            if with_data:
                items["data"] = ocp.args.JsonRestore()
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # corrupt / truncated / partially deleted checkpoint
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                log.warning("checkpoint %s/%d does not restore (%s); trying the previous one",
                            self.directory, step, msg[:200])
                print(f"warning: checkpoint step {step} in {self.directory} is unreadable "
                      f"({type(e).__name__}); using the previous one", flush=True)
                continue
            data = restored.get("data") if with_data else None
            return step, restored["state"], data
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree: Any) -> Any:
    """Concrete (sharded) arrays -> ShapeDtypeStructs carrying the same shardings."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree)
