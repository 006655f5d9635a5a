"""Training checkpoints that survive crashes: sharded and written in the background, checksummed, atomic.

Layout under a checkpoint directory (any artifact URI):

    step-00001000/__0_0.distcp, ...       tensors (weights, optimiser, Polyak, RNG), each rank writing its part
    step-00001000/.metadata               torch.distributed.checkpoint's index of every tensor
    step-00001000/state.json              step, optimiser param groups, loader position, RNG and scaler state
    step-00001000/manifest.json           sha256 and size of each file above — written after them
    latest.json                           {"step": 1000, "path": "step-00001000"} — written after the manifest

:meth:`CheckpointManager.save` copies the tensors to host memory and returns; torch.distributed.checkpoint's
``async_save`` writes them to a local staging folder while training goes on, and a background thread then moves
each file into place with :func:`vit.storage.publish_file` (a rename on one filesystem, an upload to S3), and
rank 0 writes the manifest and the pointer. A reader trusts a step only if its manifest exists and every checksum
matches; if the newest is damaged it falls back to the previous good one, so a crash or a corrupted upload costs at
most one checkpoint interval.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vit import storage

TensorDict = dict[str, torch.Tensor]
_STEP_DIR = re.compile(r"^step-(\d{8})$")
# DCP says so on every single-process save and load; that is the intended use here (see _process_group).
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class CheckpointCorruptError(RuntimeError):
    pass


@dataclass
class LoadedCheckpoint:
    step: int
    uri: str
    tensors: dict[str, TensorDict]  # group ("model", "optimizer", "extra") -> tensors
    state: dict[str, Any]


def _process_group() -> dist.ProcessGroup | None:
    """A gloo group for the checkpoint's own collectives: ``async_save`` runs them on a background thread, which
    must not share a communicator with the training step's NCCL all-reduces. None for one process, where
    ``async_save(no_dist=True)`` needs no group at all."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.new_group(backend="gloo")
    return None


class _Writing:
    """One checkpoint being written: DCP's future, then publishing, the manifest and the pointer on a thread."""

    def __init__(self, manager: CheckpointManager, step: int, future, staging: Path, state: dict | None):
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, args=(manager, step, future, staging, state), name=f"checkpoint-{step}", daemon=True
        )
        self.thread.start()

    def _run(self, manager: CheckpointManager, step: int, future, staging: Path, state: dict | None) -> None:
        files = None
        try:
            future.result()
            if state is not None:
                (staging / "state.json").write_text(json.dumps(state, sort_keys=True))
            files = {p.name: {"sha256": storage.sha256_file(p), "size": p.stat().st_size} for p in staging.iterdir()}
            for name in files:
                storage.publish_file(staging / name, storage.join(manager.step_uri(step), name))
        except BaseException as exc:  # noqa: BLE001 - re-raised on the training thread by wait()
            self.error, files = exc, None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        try:  # also after a failure here: the other ranks wait for this rank's part (or its absence)
            manager.finish(step, files)
        except BaseException as exc:  # noqa: BLE001 - as above
            self.error = self.error or exc


class CheckpointManager:
    def __init__(self, directory: str, keep: int = 2):
        self.directory = storage.validate_uri(directory).rstrip("/")
        self.keep = max(keep, 1)
        self.group = _process_group()
        self.rank = dist.get_rank() if self.group is not None else 0
        self._writing: _Writing | None = None
        self._writing_uri: str | None = None

    def step_uri(self, step: int) -> str:
        return storage.join(self.directory, f"step-{step:08d}")

    def save(self, step: int, tensors: dict[str, TensorDict], state: dict[str, Any] | None) -> str:
        """Start writing one checkpoint and return its URI; every rank calls this with its tensors (replicated
        ones are written once), rank 0 with ``state``. The tensors are copied before it returns, so training may
        change them at once; :meth:`wait` blocks until the checkpoint is complete."""
        import torch.distributed.checkpoint as dcp

        self.wait()
        if self.rank == 0:
            storage.delete_prefix(self.step_uri(step))  # what a crash left of an earlier attempt at this step
        if self.group is not None:
            dist.barrier(group=self.group)
        flat = {f"{group}/{key}": t.detach() for group, td in tensors.items() for key, t in td.items()}
        staging = Path(tempfile.mkdtemp(prefix=f"vitflow-ckpt-{step}-"))
        writer = dcp.FileSystemWriter(staging, sync_files=False)  # durability comes from publish_file
        future = dcp.async_save(flat, storage_writer=writer, process_group=self.group, no_dist=self.group is None)
        self._writing = _Writing(self, step, future, staging, state if self.rank == 0 else None)
        self._writing_uri = self.step_uri(step)
        return self._writing_uri

    def wait(self) -> str | None:
        """Block until the checkpoint being written (if any) is complete; its URI, or None if none was pending.
        An error of the background write is raised here."""
        writing, uri = self._writing, self._writing_uri
        if writing is None:
            return None
        self._writing = self._writing_uri = None
        writing.thread.join()
        if writing.error is not None:
            raise writing.error
        return uri

    def finish(self, step: int, files: dict[str, dict[str, Any]] | None) -> None:
        """After every rank published its files (``files`` None: this rank failed): rank 0 writes the manifest,
        then moves the pointer; if any rank failed, neither, and the previous checkpoint stays the latest."""
        parts = [files]
        if self.group is not None:
            parts = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(parts, files, group=self.group)
        if self.rank != 0 or files is None:
            return
        if None in parts:
            raise RuntimeError(f"checkpoint of step {step}: rank {parts.index(None)} could not write its part")
        files = {name: meta for part in parts for name, meta in part.items()}
        manifest = {"step": step, "files": files}
        storage.write_text(storage.join(self.step_uri(step), "manifest.json"), json.dumps(manifest))
        storage.write_text(
            storage.join(self.directory, "latest.json"), json.dumps({"step": step, "path": f"step-{step:08d}"})
        )
        self._prune(step)

    def _steps(self) -> list[int]:
        return sorted(int(m.group(1)) for d in storage.list_dirs(self.directory) if (m := _STEP_DIR.match(d)))

    def _prune(self, newest: int) -> None:
        for step in [s for s in self._steps() if s < newest][: -(self.keep - 1) or None]:
            storage.delete_prefix(self.step_uri(step))

    def latest_step(self) -> int | None:
        uri = storage.join(self.directory, "latest.json")
        if not storage.exists(uri):
            return None
        return int(json.loads(storage.read_text(uri))["step"])

    def _load_step(self, step: int) -> LoadedCheckpoint:
        base = self.step_uri(step)
        manifest_uri = storage.join(base, "manifest.json")
        if not storage.exists(manifest_uri):
            raise CheckpointCorruptError(f"{base}: incomplete (no manifest)")
        manifest = json.loads(storage.read_text(manifest_uri))
        with tempfile.TemporaryDirectory(prefix="vitflow-ckpt-") as scratch:
            folder = self._verified_copy(base, manifest["files"], Path(scratch))
            state = json.loads((folder / "state.json").read_text())
            tensors = _read_tensors(folder)
        return LoadedCheckpoint(step, base, tensors, state)

    def _verified_copy(self, base: str, files: dict[str, dict[str, Any]], scratch: Path) -> Path:
        """The step's folder on local disk (S3: downloaded into ``scratch``), every file checked against the
        manifest."""
        folder = scratch if storage.is_s3(base) else storage.local_path(base)
        for name, meta in files.items():
            try:
                path = (
                    storage.download(storage.join(base, name), scratch / name) if folder == scratch else folder / name
                )
                digest = storage.sha256_file(path)
            except (storage.StorageError, OSError) as e:
                raise CheckpointCorruptError(f"{base}/{name}: {e}") from None
            if digest != meta["sha256"]:
                raise CheckpointCorruptError(f"{base}/{name}: checksum mismatch")
        return folder

    def load_latest(self, on_skip=None) -> LoadedCheckpoint | None:
        """The newest checkpoint whose files all verify; damaged ones are reported to ``on_skip`` and skipped."""
        latest = self.latest_step()
        candidates = sorted({*self._steps(), *([latest] if latest is not None else [])}, reverse=True)
        for step in candidates:
            try:
                return self._load_step(step)
            except CheckpointCorruptError as e:
                if on_skip is not None:
                    on_skip(str(e))
        return None


def _read_tensors(folder: Path) -> dict[str, TensorDict]:
    """Every tensor of a DCP folder, allocated from its metadata and loaded in this process alone."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(folder)
    flat = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in reader.read_metadata().state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }
    dcp.load(flat, storage_reader=reader, no_dist=True)
    tensors: dict[str, TensorDict] = {}
    for key, value in flat.items():
        group, name = key.split("/", 1)
        tensors.setdefault(group, {})[name] = value
    return tensors


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[TensorDict, dict[str, Any]]:
    """Split an optimiser state dict into tensors (safetensors) and the JSON-able rest."""
    sd = optimizer.state_dict()
    tensors: TensorDict = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: TensorDict, meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, entries in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entries)
    groups = meta["param_groups"]
    for group in groups:  # JSON turned tuples into lists
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
