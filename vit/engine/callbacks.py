"""How training reports progress without vit/ importing MLflow or Prefect.

The trainer calls ``callback(event, step, data)`` for events ``start``, ``metrics``, ``eval``, ``checkpoint``,
``end``. :class:`JsonlLog` appends them to a file that a supervising process (the Prefect task) tails and forwards
to MLflow; :class:`ProgressBar` draws step, loss, lr, img/s and ETA on stderr.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Protocol


class Callback(Protocol):
    def __call__(self, event: str, step: int, data: dict[str, Any]) -> None: ...


class JsonlLog:
    """One JSON object per event, flushed immediately (``{"event", "step", "time", **data}``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, event: str, step: int, data: dict[str, Any]) -> None:
        line = json.dumps({"event": event, "step": step, "time": time.time(), **data}, default=str)
        with open(self.path, "a") as f:
            f.write(line + "\n")


class ProgressBar:
    """A tqdm bar over training steps with the latest loss, learning rate and throughput."""

    def __init__(self, desc: str = "train", disable: bool = False):
        self.desc = desc
        self.disable = disable
        self.bar = None

    def __call__(self, event: str, step: int, data: dict[str, Any]) -> None:
        from tqdm import tqdm

        if event == "start":
            self.bar = tqdm(
                total=data["total_steps"],
                initial=step,
                desc=self.desc,
                unit="step",
                file=sys.stderr,
                disable=self.disable,
                dynamic_ncols=True,
            )
        elif self.bar is None:
            return
        elif event == "metrics":
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(
                loss=f"{data['train/loss']:.4f}",
                lr=f"{data['train/lr']:.2e}",
                img_s=f"{data['train/images_per_s']:.0f}",
                refresh=False,
            )
        elif event == "eval":
            self.bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in data.items()))
        elif event == "end":
            self.bar.update(step - self.bar.n)
            self.bar.close()
