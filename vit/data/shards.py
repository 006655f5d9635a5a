"""WebDataset-compatible tar shards: writing them during preparation, reading samples back, decoding images.

Each sample is two tar members, ``<key>.<jpg|png>`` (the encoded image) and ``<key>.cls`` (the label as text), so
``webdataset`` and plain ``tar`` read the shards as they are. The manifest records each image's byte offset and
size, so readers need no tar parsing: they stream a shard and take the byte ranges they want. Nothing is ever
extracted to disk, yet a shard is untrusted input: a manifest may only name shards inside the dataset's
``shards/`` folder, and every member read must sit behind its own tar header as a regular file with a relative name
and the manifest's size, so an archive with ``../`` or absolute names, symlinks or hard links is refused.
"""

from __future__ import annotations

import io
import math
import re
import tarfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from vit import storage
from vit.data.base import DataError

if TYPE_CHECKING:
    import torch

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec (not a dependency here); they remain the
# fastest decoders available to us, and the warning would fire on every image.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

BLOCK = 512
_SHARD_NAME = re.compile(r"^shards/[A-Za-z0-9_-][A-Za-z0-9._-]*\.tar$")
JPEG_MAGIC = b"\xff\xd8"
PNG_MAGIC = b"\x89PNG"


def _member_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0  # shards are a pure function of their content
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


class ShardWriter:
    """Appends samples to ``<prefix>/<group>-NNNNNN.tar`` shards of at most ``max_bytes`` (unless one sample is
    larger) and ``max_samples``; each finished shard is published through the storage layer in the background."""

    def __init__(
        self, prefix: str, group: str, staging: Path, uploads: ThreadPoolExecutor, max_bytes: int, max_samples: int
    ) -> None:
        self.prefix, self.group, self.staging, self.uploads = prefix, group, staging, uploads
        self.max_bytes, self.max_samples = max_bytes, max_samples
        self.index = -1
        self.file: io.BufferedWriter | None = None
        self.tmp: Path | None = None
        self.bytes = self.samples = 0
        self.published: list[Future] = []

    @property
    def name(self) -> str:
        return f"{self.group}-{self.index:06d}.tar"

    def add(self, key: str, ext: str, data: bytes, label: int) -> tuple[str, int]:
        """Write one sample; returns (shard file name, byte offset of the image data)."""
        image_header = _member_header(f"{key}.{ext}", len(data))
        cls = str(label).encode()
        cls_header = _member_header(f"{key}.cls", len(cls))
        size = len(image_header) + len(data) + len(_padding(len(data))) + len(cls_header) + BLOCK
        full = self.samples >= self.max_samples or (self.bytes > 0 and self.bytes + size + 2 * BLOCK > self.max_bytes)
        if self.file is None or full:
            self._roll()
        offset = self.bytes + len(image_header)
        assert self.file is not None
        for chunk in (image_header, data, _padding(len(data)), cls_header, cls, _padding(len(cls))):
            self.file.write(chunk)
        self.bytes += size
        self.samples += 1
        return self.name, offset

    def _roll(self) -> None:
        self._finish()
        self.index += 1
        self.tmp = self.staging / f".{self.name}.partial"
        self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed in _finish
        self.bytes = self.samples = 0

    def _finish(self) -> None:
        if self.file is None:
            return
        self.file.write(b"\0" * (2 * BLOCK))  # end-of-archive marker
        self.file.close()
        self.file = None
        uri = storage.join(self.prefix, self.name)
        self.published.append(self.uploads.submit(storage.publish_file, self.tmp, uri))

    def close(self) -> None:
        """Finish the last shard and wait until every shard is published (re-raising a failed upload)."""
        self._finish()
        for future in self.published:
            future.result()

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
            if self.tmp is not None:
                self.tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------------
# Reading


def _skip(stream, n: int) -> None:
    if n <= 0:
        return
    if getattr(stream, "seekable", lambda: False)():
        stream.seek(n, io.SEEK_CUR)
        return
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            raise storage.StorageError("shard ended early: it is truncated; prepare the dataset again")
        n -= len(chunk)


def _read_exact(stream, n: int) -> bytes:
    data = stream.read(n)
    while len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            raise storage.StorageError("shard ended early: it is truncated; prepare the dataset again")
        data += more
    return data


def shard_uri(dataset_uri: str, name: str) -> str:
    """The URI of a shard a manifest names; a name outside the dataset's ``shards/`` folder is refused."""
    if not _SHARD_NAME.match(name) or ".." in name:
        raise DataError(f"{dataset_uri}: the manifest names shard {name!r}, outside shards/: refused")
    return storage.join(dataset_uri, name)


def check_member(uri: str, header: bytes, size: int) -> None:
    """The tar header in front of a sample must describe a regular file of ``size`` bytes with a relative name."""
    try:
        info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
    except tarfile.HeaderError as exc:
        raise DataError(f"{uri}: no valid tar header in front of a sample ({exc}): not a vitflow shard") from None
    name = PurePosixPath(info.name)
    if not info.isreg() or info.size != size or name.is_absolute() or ".." in name.parts:
        raise DataError(
            f"{uri}: refused member {info.name!r} (tar type {info.type!r}, {info.size} bytes, manifest {size}): "
            "only regular files with relative names"
        )


def read_members(uri: str, offsets: Sequence[int], sizes: Sequence[int]) -> Iterator[bytes]:
    """The bytes at each (offset, size) of one shard, offsets ascending, each checked against its tar header
    (:func:`check_member`): one sequential stream over the shard, or one ranged read per member when they are a
    sparse few of a remote shard."""
    if not len(offsets):
        return
    if int(offsets[0]) < BLOCK:
        raise DataError(f"{uri}: a sample at offset {int(offsets[0])} has no room for its tar header")
    span = offsets[-1] + sizes[-1] - offsets[0]
    if storage.is_s3(uri) and 8 * sum(sizes) < span:
        for offset, size in zip(offsets, sizes, strict=True):
            data = storage.read_range(uri, int(offset) - BLOCK, int(size) + BLOCK)
            check_member(uri, data[:BLOCK], int(size))
            yield data[BLOCK:]
        return
    with storage.open_stream_at(uri, int(offsets[0]) - BLOCK) as stream:
        pos = int(offsets[0]) - BLOCK
        for offset, size in zip(offsets, sizes, strict=True):
            _skip(stream, int(offset) - BLOCK - pos)
            check_member(uri, _read_exact(stream, BLOCK), int(size))
            yield _read_exact(stream, int(size))
            pos = int(offset) + int(size)


# --------------------------------------------------------------------------------------------------------------
# Decoding


def _decode_pil(data: bytes, scale: float = 1.0) -> torch.Tensor:
    import torch

    with Image.open(io.BytesIO(data)) as image:
        if scale <= 0.5 and image.format == "JPEG":
            image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
        rgb = np.array(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(rgb).permute(2, 0, 1)


def decode(data: bytes, scale: float = 1.0) -> torch.Tensor:
    """Encoded image -> uint8 RGB CHW tensor. A JPEG that may be ``scale``d by 1/2 or less (see
    ``ImageTransform.plan``) is decoded at reduced size in the DCT domain (PIL ``draft``): most of the
    decoding work saved at no loss of detail the transform keeps. Other JPEGs and PNGs go through torchvision's
    libjpeg-turbo / libpng decoders; anything else, or anything those refuse, through PIL."""
    # here: importing torch and torchvision costs seconds (torchvision pulls in torch._dynamo), which code that only
    # writes or lists shards, such as finding a dataset already prepared, need not pay; later imports are cached
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png

    try:
        if data[:2] == JPEG_MAGIC:
            if scale <= 0.5:
                return _decode_pil(data, scale)
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        if data[:4] == PNG_MAGIC:
            return decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        pass
    return _decode_pil(data)


def transform_encoded(transform: Callable | None, data: bytes, width: int, height: int) -> torch.Tensor:
    """Decode a stored ``width`` x ``height`` image and transform it; an `ImageTransform` first draws its plan, so
    the image is decoded no larger than the transform needs. No transform: the uint8 CHW image."""
    if transform is None:
        return decode(data)
    if hasattr(transform, "plan"):  # an ImageTransform (not imported here: it imports torchvision)
        plan = transform.plan(width, height)
        return transform.apply(decode(data, plan.scale), plan, width, height)
    return transform(decode(data))


def decode_batch(blobs: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Encoded images (uint8 1-D tensors) -> uint8 RGB CHW tensors on ``device``, at full size. The JPEGs are
    decoded in one batched ``torchvision.io.decode_jpeg`` call on that device (nvJPEG on CUDA); PNGs, and the
    JPEGs of a batch that call refuses, one by one on the CPU as :func:`decode` does, then moved."""
    from torchvision.io import ImageReadMode, decode_jpeg

    images: list[torch.Tensor | None] = [None] * len(blobs)
    jpegs = [i for i, blob in enumerate(blobs) if bytes(blob[:2].tolist()) == JPEG_MAGIC]
    if jpegs:
        try:
            decoded = decode_jpeg([blobs[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
            for i, image in zip(jpegs, decoded, strict=True):
                images[i] = image
        except RuntimeError:
            pass
    return [
        image if image is not None else decode(blob.numpy().tobytes()).to(device)
        for image, blob in zip(images, blobs, strict=True)
    ]
