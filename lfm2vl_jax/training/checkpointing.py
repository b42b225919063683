"""Training checkpoints under RUN_DIR/checkpoints: orbax's `CheckpointManager`, saving asynchronously
every N steps and keeping the last K.

Each checkpoint holds the train state (update count, what trains, its optimizer state, the PRNG key) and
each process's data-iterator state (grain's handler: one JSON file per process). Orbax writes a checkpoint
into a temporary directory and renames it when complete, so a process killed at any moment, even
mid-save, leaves the last complete checkpoint as the latest one; leftovers of an unfinished save are
removed when the manager next opens.

The state is stored in the layout it trains in (`RuntimeConfig.scan_layers`): converting it to the
canonical per-layer layout would copy every stacked array of params and optimizer state at each save.
The run's settings in RUN_DIR/run.json pin the layout, and a resume with a different one is refused.
Frozen weights are not stored: a resume reloads them from the base model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from ..checkpoint.orbax import quiet_orbax_reads
from .config import TrainingError

STATE, DATA = "state", "data"


class _IteratorState:
    """Grain's checkpoint handler reads `get_state()` when the (asynchronous) save runs; this holds the
    state taken at the step being saved, not that of the live iterator, which has moved on by then."""

    def __init__(self, state: dict[str, Any]):
        self.state = json.dumps(state).encode()

    def get_state(self) -> bytes:
        return self.state


class _RestoredIteratorState:
    """Receives the data-iterator state that grain's handler restores."""

    state: dict[str, Any] | None = None

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:
        pass


class Checkpoints:
    def __init__(self, directory: Path, save_every: int, keep: int):
        self.directory = directory
        self.save_every = save_every  # decided here: orbax's own interval also saves the first step
        self.manager = ocp.CheckpointManager(
            directory.absolute(),
            item_handlers={
                STATE: ocp.StandardCheckpointHandler(),
                DATA: grain.checkpoint.CheckpointHandler(),
            },
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=True,
                cleanup_tmp_directories=True,
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict[str, Any], force: bool = False) -> bool:
        """Starts saving after every `save_every`-th step (any step with `force`); returns once the arrays
        are copied off the devices, the writing continues in the background."""
        if not force and step % self.save_every:
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    STATE: ocp.args.StandardSave(state),
                    DATA: grain.checkpoint.CheckpointSave(_IteratorState(data_state)),
                }
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """(state, data-iterator state) of checkpoint `step`, the arrays placed as `abstract_state`'s
        shardings say."""
        self._check_shapes(step, abstract_state)
        data = _RestoredIteratorState()
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    STATE: ocp.args.StandardRestore(abstract_state),
                    DATA: grain.checkpoint.CheckpointRestore(data),
                }
            ),
        )
        return restored[STATE], data.state

    def _check_shapes(self, step: int, abstract_state: Any) -> None:
        """Compares the stored arrays' shapes with the run's from the checkpoint's metadata, before any
        read: a mismatch found by orbax mid-read leaves reads in flight that report on stderr later."""
        stored = self.manager.item_metadata(step)[STATE]
        if stored is None:
            return
        expected = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
        held = {_names(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(stored)[0]}
        for path, want in expected:
            have = held.get(_names(path))
            if have is not None and tuple(getattr(have, "shape", ())) != tuple(want.shape):
                raise ValueError(
                    f"{jax.tree_util.keystr(path)} is stored with shape {tuple(have.shape)}, "
                    f"this run's is {tuple(want.shape)}"
                )

    def restore_latest_good(
        self, abstract_state: Any, warn: Callable[[str], None]
    ) -> tuple[int, Any, dict[str, Any]]:
        """(step, state, data-iterator state) of the latest checkpoint that restores. A damaged one (a
        truncated or corrupt file) is moved aside to `broken-STEP` with a warning naming its step, and
        the previous one is tried; if none restores (another model's, other shapes), one error says why."""
        failures = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                with quiet_orbax_reads():
                    state, data = self.restore(step, abstract_state)
            except (ValueError, OSError, TypeError, KeyError) as err:
                failures.append((step, (str(err).strip().splitlines() or [type(err).__name__])[0]))
                continue
            for broken, reason in failures:
                aside = self.directory / f"broken-{broken}"
                os.rename(self.directory / str(broken), aside)
                warn(
                    f"the checkpoint of step {broken} does not restore ({reason}); moved to "
                    f"{aside}, resuming from step {step}"
                )
            if failures:
                self.manager.reload()
            return step, state, data
        step, reason = failures[0]
        raise TrainingError(
            f"--resume: no checkpoint in {self.directory} restores into this run (step {step}: {reason}); "
            "was it written for another model or other settings?"
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _names(path: tuple) -> tuple[str, ...]:
    """A tree path as plain names: orbax's metadata keys a named tuple's fields as a dict's."""
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract, shardings
    )
