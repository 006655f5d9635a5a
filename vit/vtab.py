"""The 19 VTAB-1k tasks: names, folder names, class counts and groups (paper-facts §8, stack-notes VTAB layout)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

Group = Literal["natural", "specialized", "structured"]
SPLITS = ("train800", "val200", "train800val200", "test")


@dataclass(frozen=True)
class VtabTask:
    name: str  # canonical folder name
    paper_name: str  # column header of the paper's Table 9
    num_classes: int
    group: Group
    folder_aliases: tuple[str, ...] = ()


TASKS: tuple[VtabTask, ...] = (
    VtabTask("caltech101", "Caltech101", 100, "natural"),
    VtabTask("cifar", "CIFAR-100", 100, "natural", ("cifar100",)),
    VtabTask("dtd", "DTD", 47, "natural"),
    VtabTask("oxford_flowers102", "Flowers102", 102, "natural"),
    VtabTask("oxford_iiit_pet", "Pets", 37, "natural", ("oxford_pet",)),
    VtabTask("sun397", "Sun397", 397, "natural"),
    VtabTask("svhn", "SVHN", 10, "natural"),
    VtabTask("patch_camelyon", "Camelyon", 2, "specialized"),
    VtabTask("eurosat", "EuroSAT", 10, "specialized"),
    VtabTask("resisc45", "Resisc45", 45, "specialized"),
    VtabTask("diabetic_retinopathy", "Retinopathy", 5, "specialized"),
    VtabTask("clevr_count", "Clevr-Count", 8, "structured"),
    VtabTask("clevr_dist", "Clevr-Dist", 6, "structured"),
    VtabTask("dmlab", "DMLab", 6, "structured"),
    VtabTask("dsprites_loc", "dSpr-Loc", 16, "structured"),
    VtabTask("dsprites_ori", "dSpr-Ori", 16, "structured"),
    VtabTask("kitti", "KITTI-Dist", 4, "structured"),
    VtabTask("smallnorb_azi", "sNORB-Azim", 18, "structured"),
    VtabTask("smallnorb_ele", "sNORB-Elev", 9, "structured"),
)

GROUPS: tuple[Group, ...] = ("natural", "specialized", "structured")
_BY_NAME = {alias: t for t in TASKS for alias in (t.name, *t.folder_aliases)}


def task(name: str) -> VtabTask:
    """A task by canonical or alternative folder name ("cifar" / "cifar100", "oxford_iiit_pet" / "oxford_pet")."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown VTAB-1k task {name!r}; known: {', '.join(t.name for t in TASKS)}") from None


def vtab_task_name(name: str) -> str:
    """Canonical VTAB task for a folder name, alias or Table 9 header ("cifar100", "CIFAR-100" -> "cifar")."""
    by_paper_name = {t.paper_name.lower(): t.name for t in TASKS}
    return by_paper_name.get(name.lower()) or task(name).name


def vtab_summary(per_task: Mapping[str, float]) -> dict:
    """Group means and the 19-task mean of VTAB-1k accuracies (paper-facts §8; units as given).

    Returns ``natural``, ``specialized``, ``structured`` (mean over the group's tasks), ``mean`` (mean over all
    tasks, not of the group means, as Table 9's "Mean") and ``missing`` (canonical names of absent tasks). With
    tasks missing, each mean is over the tasks present (NaN for a group with none): check ``missing`` before
    comparing with the paper.
    """
    values: dict[str, float] = {}
    for name, value in per_task.items():
        key = vtab_task_name(name)
        if key in values:
            raise ValueError(f"VTAB task {key!r} given twice (as {name!r})")
        values[key] = float(value)
    summary: dict = {}
    for group in GROUPS:
        present = [values[t.name] for t in TASKS if t.group == group and t.name in values]
        summary[group] = float(np.mean(present)) if present else math.nan
    summary["mean"] = float(np.mean(list(values.values()))) if values else math.nan
    summary["missing"] = [t.name for t in TASKS if t.name not in values]
    return summary
