"""SIGKILL of the training process at random points: each relaunch resumes from the last checkpoint, and the final
weights are bit-identical to an uninterrupted run (CPU, deterministic mode).

The flow-level version (SIGKILL of a whole `vitflow run`, then a re-run that resumes) is
tests/test_pipeline.py::test_killed_run_resumes_from_its_checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import signal

import torch

from tests.reliability.conftest import events, launch_engine, train_config, wait_for
from vit.checkpoints import load_checkpoint
from vit.engine.train_state import CheckpointManager

STEPS = 40


def test_sigkill_at_five_random_points_resumes_to_identical_weights(tiny_dataset, tmp_path):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference = launch_engine(train_config(tiny_dataset, str(reference_dir / "ckpt"), STEPS), reference_dir)

    points = sorted(random.Random(8).sample(range(2, STEPS - 1), 5))  # one kill per launch, in step order
    ckpt = str(killed_dir / "ckpt")
    config = train_config(tiny_dataset, ckpt, STEPS)
    manager = CheckpointManager(ckpt)
    resumed_from = []
    for point in points:
        before = len(events(killed_dir))
        proc = launch_engine(config, killed_dir)

        def reached(point=point, before=before) -> bool:
            return any(e["event"] == "metrics" and e["step"] >= point for e in events(killed_dir)[before:])

        wait_for(reached, f"step {point}", proc=proc, interval=0.005)
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        start = next(e for e in events(killed_dir)[before:] if e["event"] == "start")
        resumed_from.append(start["resumed_from"])
        latest = manager.latest_step()
        assert latest is not None and latest < STEPS, "the run finished before it was killed"
        # what a kill leaves behind verifies: the pointer's step, or a newer one killed after its manifest
        loaded = manager.load_latest()
        assert loaded is not None and latest <= loaded.step < STEPS
    before = len(events(killed_dir))
    final = launch_engine(config, killed_dir)
    assert final.wait(timeout=300) == 0, (killed_dir / "engine.log").read_text()[-3000:]
    assert reference.wait(timeout=300) == 0, (reference_dir / "engine.log").read_text()[-3000:]

    last_start = next(e for e in events(killed_dir)[before:] if e["event"] == "start")
    resumed_from.append(last_start["resumed_from"])
    assert resumed_from[0] is None and all(r is not None for r in resumed_from[1:])
    assert resumed_from[1:] == sorted(resumed_from[1:])  # every relaunch continued from where the last one got
    # final weights, and the whole final training state, bit for bit
    expected, _ = load_checkpoint(str(reference_dir / "ckpt" / "model.safetensors"))
    got, _ = load_checkpoint(str(killed_dir / "ckpt" / "model.safetensors"))
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    ref_state = CheckpointManager(str(reference_dir / "ckpt")).load_latest()
    state = manager.load_latest()
    assert ref_state.step == state.step == STEPS
    for stem in ("model", "optimizer"):
        assert all(torch.equal(ref_state.tensors[stem][k], state.tensors[stem][k]) for k in ref_state.tensors[stem])
    assert json.dumps(ref_state.state["data"]) == json.dumps(state.state["data"])
