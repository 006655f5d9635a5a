"""vit.data: any dataset the paper uses, in the format users have it, prepared once into validated, fingerprinted
WebDataset shards in the artifact store (a local directory or S3), and read back fast, deterministically and
resumably by one process or every rank of a multi-node job.

    uri = prepare_dataset("cifar10:/data/cifar-10-batches-py", "cifar10", "s3://bucket")
    ds = open_dataset(uri)
    loader = ds.loader("train", 512, build_transform("finetune", 384), num_workers=8)
    for batch in loader: ...        # Batch(images, labels, index)

The names below are imported on first use, as in ``vit``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vit import lazy_export

if TYPE_CHECKING:
    from vit.data.base import CorruptDataError, DataError
    from vit.data.dataset import PreparedDataset, open_dataset
    from vit.data.loader import Batch, MapDataset, ShardLoader
    from vit.data.prepare import prepare_dataset
    from vit.data.sources import FORMATS
    from vit.data.synthetic import VTAB_TASKS as SYNTHETIC_VTAB_TASKS
    from vit.data.transforms import KINDS as TRANSFORM_KINDS
    from vit.data.transforms import ImageTransform, build_transform

_EXPORTS = {
    "CorruptDataError": "vit.data.base",
    "DataError": "vit.data.base",
    "MapDataset": "vit.data.loader",
    "PreparedDataset": "vit.data.dataset",
    "open_dataset": "vit.data.dataset",
    "Batch": "vit.data.loader",
    "ShardLoader": "vit.data.loader",
    "prepare_dataset": "vit.data.prepare",
    "FORMATS": "vit.data.sources",
    "ImageTransform": "vit.data.transforms",
    "build_transform": "vit.data.transforms",
    "SYNTHETIC_VTAB_TASKS": "vit.data.synthetic:VTAB_TASKS",
    "TRANSFORM_KINDS": "vit.data.transforms:KINDS",
}
__all__ = [
    "FORMATS",
    "SYNTHETIC_VTAB_TASKS",
    "TRANSFORM_KINDS",
    "Batch",
    "CorruptDataError",
    "DataError",
    "ImageTransform",
    "MapDataset",
    "PreparedDataset",
    "ShardLoader",
    "build_transform",
    "open_dataset",
    "prepare_dataset",
]


def __getattr__(name: str) -> Any:
    return lazy_export(__name__, _EXPORTS, name)
