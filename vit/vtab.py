"""The 19 VTAB-1k tasks: names, folder names, class counts and groups (paper-facts §8, stack-notes VTAB layout)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
