"""Training checkpoints that survive crashes: atomic, checksummed, with a "latest" pointer that moves last.

Layout under a checkpoint directory (any artifact URI):

    step-00001000/model.safetensors       weights (vit naming)
    step-00001000/optimizer.safetensors   optimiser tensors (+ Polyak weights, RNG states)
    step-00001000/state.json              step, optimiser param groups, loader position, RNG and scaler state
    step-00001000/manifest.json           sha256 and size of each file above — written after them
    latest.json                           {"step": 1000, "path": "step-00001000"} — written after the manifest

A reader trusts a step only if its manifest exists and every checksum matches; if the newest is damaged it falls
back to the previous good one, so a crash or a corrupted upload costs at most one checkpoint interval.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import torch

from vit import storage

TensorDict = dict[str, torch.Tensor]
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointCorruptError(RuntimeError):
    pass


@dataclass
class LoadedCheckpoint:
    step: int
    uri: str
    tensors: dict[str, TensorDict]  # file stem -> tensors
    state: dict[str, Any]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CheckpointManager:
    def __init__(self, directory: str, keep: int = 2):
        self.directory = storage.validate_uri(directory).rstrip("/")
        self.keep = max(keep, 1)

    def step_uri(self, step: int) -> str:
        return storage.join(self.directory, f"step-{step:08d}")

    def save(self, step: int, tensors: dict[str, TensorDict], state: dict[str, Any]) -> str:
        """Write one checkpoint; returns its URI. ``tensors`` maps a file stem to a tensor dict."""
        from safetensors.torch import save

        base = self.step_uri(step)
        manifest: dict[str, dict[str, Any]] = {}
        blobs = {
            f"{stem}.safetensors": save({k: v.detach().contiguous().cpu() for k, v in td.items()})
            for stem, td in tensors.items()
        }
        blobs["state.json"] = json.dumps(state, sort_keys=True).encode()
        for name, data in blobs.items():
            storage.write_bytes(storage.join(base, name), data)
            manifest[name] = {"sha256": _sha256(data), "size": len(data)}
        storage.write_text(storage.join(base, "manifest.json"), json.dumps({"step": step, "files": manifest}))
        storage.write_text(
            storage.join(self.directory, "latest.json"), json.dumps({"step": step, "path": f"step-{step:08d}"})
        )
        self._prune(step)
        return base

    def wait(self) -> None:
        """Block until the checkpoint being written (if any) is complete."""

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
        from safetensors.torch import load

        base = self.step_uri(step)
        manifest_uri = storage.join(base, "manifest.json")
        if not storage.exists(manifest_uri):
            raise CheckpointCorruptError(f"{base}: incomplete (no manifest)")
        manifest = json.loads(storage.read_text(manifest_uri))
        tensors: dict[str, TensorDict] = {}
        state: dict[str, Any] = {}
        for name, meta in manifest["files"].items():
            try:
                data = storage.read_bytes(storage.join(base, name))
            except storage.StorageError as e:
                raise CheckpointCorruptError(f"{base}/{name}: {e}") from None
            if _sha256(data) != meta["sha256"]:
                raise CheckpointCorruptError(f"{base}/{name}: checksum mismatch")
            if name == "state.json":
                state = json.loads(data)
            else:
                tensors[name.removesuffix(".safetensors")] = load(data)
        return LoadedCheckpoint(step, base, tensors, state)

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
