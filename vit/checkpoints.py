"""Checkpoints: official ``.npz`` files, timm and torchvision state dicts, and vitflow's own safetensors files.

Everything is converted to vit's naming (which is timm's, plus ``pre_logits.fc`` and the hybrid stem's
``patch_embed.backbone.*``) and loaded strictly: a wrong shape, a missing or an unknown key is one error that
names them, never a silent partial load. Nothing here unpickles arbitrary objects: ``.npz`` with
``allow_pickle=False``, ``.pt``/``.pth`` only through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vit import storage
from vit.bit import ResNetV2, bit_options
from vit.configs import BiTConfig, ViTConfig, config_from_dict, is_bit, model_config
from vit.model import VisionTransformer

StateDict = dict[str, torch.Tensor]
METADATA_KEY = "vitflow"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: unknown layout, wrong shapes, unsafe or truncated file."""


# --------------------------------------------------------------------------------------------------------------
# Official vision_transformer / big_vision .npz


def _read_npz(path_or_uri: str | os.PathLike) -> dict[str, np.ndarray]:
    path = storage.fetch(path_or_uri)
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except ValueError as e:  # object arrays need pickle: refused
        raise CheckpointError(f"{path}: refused, the file holds pickled objects ({e})") from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable .npz file (truncated or corrupt): {e}") from None


def _strip_prefix(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model parameters of a file: under ``opt/target/`` (flax.optim training checkpoints, next to
    ``opt/state/``) or ``params/`` (big_vision, next to ``opt/`` and ``chrono/`` in training checkpoints)."""
    for prefix in ("opt/target/", "params/"):
        if any(k.startswith(prefix) for k in arrays):
            arrays = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
    return arrays


def _describe_layout(arrays: Mapping[str, np.ndarray]) -> str:
    """What a file holds, for an error: its top-level groups with their key counts, and a few keys."""
    groups: dict[str, int] = {}
    for key in arrays:
        groups[key.split("/")[0]] = groups.get(key.split("/")[0], 0) + 1
    listed = ", ".join(f"{g} ({n})" for g, n in sorted(groups.items())[:12])
    return f"found top-level groups {listed or '(none)'}; e.g. keys {sorted(arrays)[:6]}"


def _unstack_scanned(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """big_vision ``scan=True`` checkpoints stack blocks on a leading axis under ``Transformer/encoderblock/``."""
    out = {}
    for key, value in arrays.items():
        if key.startswith("Transformer/encoderblock/"):
            rest = key[len("Transformer/encoderblock/") :]
            for i in range(value.shape[0]):
                out[f"Transformer/encoderblock_{i}/{rest}"] = value[i]
        else:
            out[key] = value
    return out


def _block_subnames(arrays: Mapping[str, np.ndarray]) -> tuple[str, str, str, str]:
    """(ln1, attention, ln2, mlp) module names: pre-Linen numbering (0,1,2,3) or Linen (0,0,1,0)."""
    if any("/MultiHeadDotProductAttention_1/" in k for k in arrays):
        return "LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"
    return "LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _conv(kernel: np.ndarray) -> torch.Tensor:
    return _t(kernel.transpose(3, 2, 0, 1))  # HWIO -> OIHW


def _norm(arrays: Mapping[str, np.ndarray], flax: str, ours: str, sd: StateDict) -> None:
    sd[f"{ours}.weight"] = _t(arrays[f"{flax}/scale"].reshape(-1))  # old GroupNorms store (1, 1, 1, C)
    sd[f"{ours}.bias"] = _t(arrays[f"{flax}/bias"].reshape(-1))


def _dense(arrays: Mapping[str, np.ndarray], flax: str, ours: str, sd: StateDict) -> None:
    sd[f"{ours}.weight"] = _t(arrays[f"{flax}/kernel"].T)
    sd[f"{ours}.bias"] = _t(arrays[f"{flax}/bias"])


def _convert_npz(arrays: dict[str, np.ndarray]) -> StateDict:
    arrays = _unstack_scanned(_strip_prefix(arrays))
    if "MAPHead_0/probe" in arrays or any(k.startswith("MAPHead_0/") for k in arrays):
        raise CheckpointError("MAP-pooling (attention-pooling head) checkpoints are not supported; use token or gap")
    sd: StateDict = {}
    if "cls" in arrays:
        sd["cls_token"] = _t(arrays["cls"])
    if "Transformer/posembed_input/pos_embedding" in arrays:  # original ViT: posemb includes the class token
        sd["pos_embed"] = _t(arrays["Transformer/posembed_input/pos_embedding"])
    else:
        key = "pos_embedding" if "pos_embedding" in arrays else "Transformer/pos_embedding"
        if key not in arrays:
            raise CheckpointError(
                "no position embedding found (expected Transformer/posembed_input/pos_embedding, "
                f"Transformer/pos_embedding or pos_embedding); {_describe_layout(arrays)}"
            )
        posemb = _t(arrays[key])
        if "cls_token" in sd and key == "pos_embedding":
            # big_vision adds posemb before prepending cls, so cls has no posemb: give it a zero entry.
            posemb = torch.cat([torch.zeros_like(posemb[:, :1]), posemb], dim=1)
        sd["pos_embed"] = posemb
    sd["patch_embed.proj.weight"] = _conv(arrays["embedding/kernel"])
    sd["patch_embed.proj.bias"] = _t(arrays["embedding/bias"])

    ln1, mha, ln2, mlp = _block_subnames(arrays)
    depth = len({m.group(1) for k in arrays if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))})
    for i in range(depth):
        src, dst = f"Transformer/encoderblock_{i}", f"blocks.{i}"
        _norm(arrays, f"{src}/{ln1}", f"{dst}.norm1", sd)
        _norm(arrays, f"{src}/{ln2}", f"{dst}.norm2", sd)
        att = f"{src}/{mha}"
        q, k, v = (arrays[f"{att}/{n}/kernel"] for n in ("query", "key", "value"))
        dim = q.shape[0]
        sd[f"{dst}.attn.qkv.weight"] = torch.cat([_t(w.reshape(dim, -1).T) for w in (q, k, v)])
        sd[f"{dst}.attn.qkv.bias"] = torch.cat(
            [_t(arrays[f"{att}/{n}/bias"].reshape(-1)) for n in ("query", "key", "value")]
        )
        out = arrays[f"{att}/out/kernel"]
        sd[f"{dst}.attn.proj.weight"] = _t(out.reshape(-1, out.shape[-1]).T)
        sd[f"{dst}.attn.proj.bias"] = _t(arrays[f"{att}/out/bias"])
        _dense(arrays, f"{src}/{mlp}/Dense_0", f"{dst}.mlp.fc1", sd)
        _dense(arrays, f"{src}/{mlp}/Dense_1", f"{dst}.mlp.fc2", sd)
    _norm(arrays, "Transformer/encoder_norm", "norm", sd)
    if "pre_logits/kernel" in arrays:
        _dense(arrays, "pre_logits", "pre_logits.fc", sd)
    if "head/kernel" in arrays:
        _dense(arrays, "head", "head", sd)

    if "conv_root/kernel" in arrays:  # hybrid ResNet stem
        stem = "patch_embed.backbone"
        sd[f"{stem}.conv_root.weight"] = _conv(arrays["conv_root/kernel"])
        _norm(arrays, "gn_root", f"{stem}.gn_root", sd)
        stages = sorted({int(m.group(1)) for k in arrays if (m := re.match(r"block(\d+)/", k))})
        for s in stages:
            units = sorted({int(m.group(1)) for k in arrays if (m := re.match(rf"block{s}/unit(\d+)/", k))})
            for u in units:
                src, dst = f"block{s}/unit{u}", f"{stem}.stages.{s - 1}.{u - 1}"
                for n in ("1", "2", "3", "_proj"):
                    if f"{src}/conv{n}/kernel" in arrays:
                        sd[f"{dst}.conv{n}.weight"] = _conv(arrays[f"{src}/conv{n}/kernel"])
                        _norm(arrays, f"{src}/gn{n}", f"{dst}.gn{n}", sd)

    used = _expected_npz_consumption(arrays)
    leftover = sorted(k for k in arrays if k not in used)
    if leftover:
        raise CheckpointError(
            f"unknown keys in .npz (unsupported layout?): {leftover[:10]}; {_describe_layout(arrays)}"
        )
    return sd


def _expected_npz_consumption(arrays: Mapping[str, np.ndarray]) -> set[str]:
    """Keys the converter reads; anything else in the file is an unknown layout."""
    known = re.compile(
        r"^(cls|pos_embedding|embedding/(kernel|bias)|head/(kernel|bias)|pre_logits/(kernel|bias)"
        r"|Transformer/(posembed_input/pos_embedding|pos_embedding|encoder_norm/(scale|bias))"
        r"|Transformer/encoderblock_\d+/(LayerNorm_\d|MultiHeadDotProductAttention_\d/(query|key|value|out)"
        r"|MlpBlock_\d/Dense_[01])/(scale|bias|kernel)"
        r"|conv_root/kernel|gn_root/(scale|bias)|block\d+/unit\d+/(conv(1|2|3|_proj)/kernel|gn(1|2|3|_proj)/(scale|bias)))$"
    )
    return {k for k in arrays if known.match(k)}


def load_npz(path_or_uri: str | os.PathLike) -> StateDict:
    """An official vision_transformer / AugReg / big_vision ``.npz`` as a state dict in vit's naming.

    Handles the original ImageNet-21k files (D x D ``pre_logits``, zeroed 21,843-way head), the fine-tuned
    imagenet21k+imagenet2012 files, AugReg files, pre-Linen and Linen module numbering, ``params/`` and
    ``opt/target/`` prefixes, scan-stacked blocks, big_vision's cls-without-posemb layout, hybrids and
    GroupNorm scales stored as (1, 1, 1, C).
    """
    return _npz_state_dict(_read_npz(path_or_uri), path_or_uri)


def _npz_state_dict(arrays: dict[str, np.ndarray], source: str | os.PathLike) -> StateDict:
    if is_bit_npz(arrays):
        return convert_bit_npz(arrays)
    try:
        return _convert_npz(arrays)
    except KeyError as e:
        found = _describe_layout(_strip_prefix(arrays))
        raise CheckpointError(f"{source}: missing key {e} for the official ViT layout; {found}") from None


def npz_num_heads(path_or_uri: str | os.PathLike) -> int | None:
    return _npz_heads(_read_npz(path_or_uri))


def _npz_heads(arrays: dict[str, np.ndarray]) -> int | None:
    arrays = _unstack_scanned(_strip_prefix(arrays))
    for key, value in arrays.items():
        if key.endswith("/query/kernel") and value.ndim == 3:
            return int(value.shape[1])
    return None


def export_npz(model: nn.Module | StateDict, path: str | os.PathLike) -> None:
    """Write a model in the official (pre-Linen) ``.npz`` layout — the inverse of :func:`load_npz`."""
    sd = {k: v.detach().float().cpu().numpy() for k, v in _state_dict(model).items()}
    heads = model.cfg.num_heads if isinstance(model, VisionTransformer) else None
    if heads is None:
        raise CheckpointError("export_npz needs a VisionTransformer (the head count is not in a state dict)")
    out: dict[str, np.ndarray] = {}

    def conv(k: np.ndarray) -> np.ndarray:
        return k.transpose(2, 3, 1, 0)  # OIHW -> HWIO

    if "cls_token" in sd:
        out["cls"] = sd["cls_token"]
    out["Transformer/posembed_input/pos_embedding"] = sd["pos_embed"]
    out["embedding/kernel"] = conv(sd["patch_embed.proj.weight"])
    out["embedding/bias"] = sd["patch_embed.proj.bias"]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        src, dst = f"blocks.{i}", f"Transformer/encoderblock_{i}"
        for ours, flax in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            out[f"{dst}/{flax}/scale"], out[f"{dst}/{flax}/bias"] = sd[f"{src}.{ours}.weight"], sd[f"{src}.{ours}.bias"]
        qkv_w, qkv_b = sd[f"{src}.attn.qkv.weight"], sd[f"{src}.attn.qkv.bias"]
        dim = qkv_w.shape[1]
        for j, name in enumerate(("query", "key", "value")):
            w = qkv_w[j * dim : (j + 1) * dim].T.reshape(dim, heads, dim // heads)
            out[f"{dst}/MultiHeadDotProductAttention_1/{name}/kernel"] = w
            out[f"{dst}/MultiHeadDotProductAttention_1/{name}/bias"] = qkv_b[j * dim : (j + 1) * dim].reshape(heads, -1)
        out[f"{dst}/MultiHeadDotProductAttention_1/out/kernel"] = sd[f"{src}.attn.proj.weight"].T.reshape(
            heads, dim // heads, dim
        )
        out[f"{dst}/MultiHeadDotProductAttention_1/out/bias"] = sd[f"{src}.attn.proj.bias"]
        for j, fc in enumerate(("fc1", "fc2")):
            out[f"{dst}/MlpBlock_3/Dense_{j}/kernel"] = sd[f"{src}.mlp.{fc}.weight"].T
            out[f"{dst}/MlpBlock_3/Dense_{j}/bias"] = sd[f"{src}.mlp.{fc}.bias"]
    out["Transformer/encoder_norm/scale"], out["Transformer/encoder_norm/bias"] = sd["norm.weight"], sd["norm.bias"]
    for ours, flax in (("pre_logits.fc", "pre_logits"), ("head", "head")):
        if f"{ours}.weight" in sd:
            out[f"{flax}/kernel"], out[f"{flax}/bias"] = sd[f"{ours}.weight"].T, sd[f"{ours}.bias"]
    stem = "patch_embed.backbone."
    for key, value in sd.items():
        if not key.startswith(stem):
            continue
        name = key[len(stem) :]
        if m := re.match(r"stages\.(\d+)\.(\d+)\.(conv|gn)(\w+)\.(weight|bias)$", name):
            s, u, kind, n, p = m.groups()
            base = f"block{int(s) + 1}/unit{int(u) + 1}/{kind}{n}"
        elif m := re.match(r"(conv_root|gn_root)\.(weight|bias)$", name):
            base, kind, p = m.group(1), m.group(1)[:4].rstrip("_"), m.group(2)
        else:
            raise CheckpointError(f"cannot export unknown stem parameter {key}")
        if base.split("/")[-1].startswith("conv"):
            out[f"{base}/kernel"] = conv(value)
        else:
            out[f"{base}/{'scale' if p == 'weight' else 'bias'}"] = value
    buf = io.BytesIO()
    np.savez(buf, **out)
    storage.write_bytes(str(path), buf.getvalue())


# --------------------------------------------------------------------------------------------------------------
# timm and torchvision


def _state_dict(model: nn.Module | Mapping[str, torch.Tensor]) -> StateDict:
    return dict(model.state_dict() if isinstance(model, nn.Module) else model)


_TIMM_KEY = re.compile(
    r"^(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)|head\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias))$"
)


def convert_timm(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """A timm ``VisionTransformer`` (token or gap pooling, no fc_norm) or BiT ``ResNetV2`` state dict in vit's
    naming."""
    sd = _state_dict(state_dict)
    if is_bit_state_dict(sd):
        return convert_timm_bit(sd)
    unknown = sorted(k for k in sd if not _TIMM_KEY.match(k))
    if unknown:
        raise CheckpointError(
            f"timm keys vit does not support (fc_norm, register tokens, qk-norm, layer scale, ...): {unknown[:10]}"
        )
    return sd


def export_timm(model: nn.Module | Mapping[str, torch.Tensor]) -> StateDict:
    """vit -> timm naming. timm's ViT has no pre-logits layer: call ``reset_classifier`` first if present."""
    sd = _state_dict(model)
    if any(k.startswith(("pre_logits.", "patch_embed.backbone.")) for k in sd):
        raise CheckpointError("timm's VisionTransformer has no pre-logits layer or hybrid stem to receive these")
    return sd


def convert_torchvision(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """A torchvision ``VisionTransformer`` state dict in vit's naming."""
    src = _state_dict(state_dict)
    sd: StateDict = {}
    rename = {
        "class_token": "cls_token",
        "conv_proj.weight": "patch_embed.proj.weight",
        "conv_proj.bias": "patch_embed.proj.bias",
        "encoder.pos_embedding": "pos_embed",
        "encoder.ln.weight": "norm.weight",
        "encoder.ln.bias": "norm.bias",
        "heads.head.weight": "head.weight",
        "heads.head.bias": "head.bias",
        "heads.pre_logits.weight": "pre_logits.fc.weight",
        "heads.pre_logits.bias": "pre_logits.fc.bias",
    }
    layer = {
        "ln_1": "norm1",
        "ln_2": "norm2",
        "self_attention.in_proj_weight": "attn.qkv.weight",
        "self_attention.in_proj_bias": "attn.qkv.bias",
        "self_attention.out_proj": "attn.proj",
        "mlp.0": "mlp.fc1",
        "mlp.linear_1": "mlp.fc1",  # torchvision < 0.14 naming
        "mlp.3": "mlp.fc2",
        "mlp.linear_2": "mlp.fc2",
    }
    unknown = []
    for key, value in src.items():
        if key in rename:
            sd[rename[key]] = value
            continue
        m = re.match(r"encoder\.layers\.encoder_layer_(\d+)\.(.+?)(\.weight|\.bias)?$", key)
        name = m and (m.group(2) + (m.group(3) or ""))
        target = None
        if m:
            for tv, ours in layer.items():
                if name == tv or name.startswith(tv + "."):
                    target = f"blocks.{m.group(1)}.{ours}{name[len(tv) :]}"
                    break
        if target is None:
            unknown.append(key)
        else:
            sd[target] = value
    if unknown:
        raise CheckpointError(f"unknown torchvision ViT keys: {sorted(unknown)[:10]}")
    return sd


def export_torchvision(model: nn.Module | Mapping[str, torch.Tensor]) -> StateDict:
    """vit -> torchvision naming (load into ``torchvision.models.VisionTransformer``)."""
    sd = _state_dict(model)
    if any(k.startswith("patch_embed.backbone.") for k in sd) or "cls_token" not in sd:
        raise CheckpointError("torchvision's VisionTransformer supports only plain ViTs with a class token")
    out: StateDict = {}
    rename = {
        "cls_token": "class_token",
        "patch_embed.proj.weight": "conv_proj.weight",
        "patch_embed.proj.bias": "conv_proj.bias",
        "pos_embed": "encoder.pos_embedding",
        "norm.weight": "encoder.ln.weight",
        "norm.bias": "encoder.ln.bias",
        "head.weight": "heads.head.weight",
        "head.bias": "heads.head.bias",
        "pre_logits.fc.weight": "heads.pre_logits.weight",
        "pre_logits.fc.bias": "heads.pre_logits.bias",
    }
    layer = {
        "norm1": "ln_1",
        "norm2": "ln_2",
        "attn.qkv.weight": "self_attention.in_proj_weight",
        "attn.qkv.bias": "self_attention.in_proj_bias",
        "attn.proj": "self_attention.out_proj",
        "mlp.fc1": "mlp.0",
        "mlp.fc2": "mlp.3",
    }
    for key, value in sd.items():
        if key in rename:
            out[rename[key]] = value
            continue
        m = re.match(r"blocks\.(\d+)\.(.+)$", key)
        if not m:
            raise CheckpointError(f"cannot export {key} to torchvision")
        for ours, tv in layer.items():
            if m.group(2) == ours or m.group(2).startswith(ours + "."):
                out[f"encoder.layers.encoder_layer_{m.group(1)}.{tv}{m.group(2)[len(ours) :]}"] = value
                break
        else:
            raise CheckpointError(f"cannot export {key} to torchvision")
    return out


def to_vit_naming(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Detect the naming of a state dict (vit/timm or torchvision) and convert it to vit's."""
    sd = _state_dict(state_dict)
    if "class_token" in sd or "encoder.pos_embedding" in sd:
        return convert_torchvision(sd)
    if is_bit_state_dict(sd):
        return convert_timm_bit(sd)
    if "model" in sd and not torch.is_tensor(sd["model"]):
        raise CheckpointError("a training checkpoint with a nested 'model' dict: pass its model state dict")
    return sd


# --------------------------------------------------------------------------------------------------------------
# BiT: big_transfer's .npz files and timm's ResNetV2 state dicts (vit.bit naming is timm's, head a nn.Linear)

_BIT_UNIT = (("a", "conv1", "norm1"), ("b", "conv2", "norm2"), ("c", "conv3", "norm3"))
_BIT_KEY = re.compile(
    r"^(stem\.conv\.weight|norm\.(weight|bias)|head\.(fc\.)?(weight|bias)"
    r"|stages\.\d+\.blocks\.\d+\.(downsample\.conv\.weight|conv[123]\.weight|norm[123]\.(weight|bias)))$"
)


def is_bit_npz(arrays: Mapping[str, np.ndarray]) -> bool:
    return any(k.startswith("resnet/") for k in arrays)


def is_bit_state_dict(sd: Mapping[str, Any]) -> bool:
    return "stem.conv.weight" in sd


def convert_bit_npz(arrays: Mapping[str, np.ndarray]) -> StateDict:
    """An official BiT ``.npz`` (google-research/big_transfer: ``resnet/root_block``, ``resnet/block{b}/unit{NN}/
    {a,b,c}/{standardized_conv2d,group_norm}``, ``a/proj`` shortcuts, ``resnet/group_norm``, ``resnet/head/conv2d``)
    in vit.bit naming; every key must be used."""
    left = dict(arrays)
    try:
        sd: StateDict = {"stem.conv.weight": _conv(left.pop("resnet/root_block/standardized_conv2d/kernel"))}
        sd["norm.weight"] = _t(left.pop("resnet/group_norm/gamma").reshape(-1))
        sd["norm.bias"] = _t(left.pop("resnet/group_norm/beta").reshape(-1))
        if "resnet/head/conv2d/kernel" in left:
            sd["head.weight"] = _t(left.pop("resnet/head/conv2d/kernel")[0, 0].T)
            sd["head.bias"] = _t(left.pop("resnet/head/conv2d/bias"))
        units = {m.group(0) for k in arrays if (m := re.match(r"resnet/block\d+/unit\d+", k))}
        for src in sorted(units):
            b, u = map(int, re.findall(r"\d+", src))
            dst = f"stages.{b - 1}.blocks.{u - 1}"
            for part, conv, norm in _BIT_UNIT:
                sd[f"{dst}.{conv}.weight"] = _conv(left.pop(f"{src}/{part}/standardized_conv2d/kernel"))
                sd[f"{dst}.{norm}.weight"] = _t(left.pop(f"{src}/{part}/group_norm/gamma").reshape(-1))
                sd[f"{dst}.{norm}.bias"] = _t(left.pop(f"{src}/{part}/group_norm/beta").reshape(-1))
            if f"{src}/a/proj/standardized_conv2d/kernel" in left:
                sd[f"{dst}.downsample.conv.weight"] = _conv(left.pop(f"{src}/a/proj/standardized_conv2d/kernel"))
    except KeyError as e:
        raise CheckpointError(f"missing key {e} for the official BiT layout") from None
    if left:
        raise CheckpointError(f"unknown keys in BiT .npz (unsupported layout?): {sorted(left)[:10]}")
    return sd


def convert_timm_bit(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """A timm BiT ``ResNetV2`` (``resnetv2_*_bit``) state dict in vit.bit naming: its 1x1-conv head as a linear."""
    sd = _state_dict(state_dict)
    unknown = sorted(k for k in sd if not _BIT_KEY.match(k))
    if unknown:
        raise CheckpointError(f"timm ResNetV2 keys BiT does not have (stem norm, deep stem, ...): {unknown[:10]}")
    if "head.fc.weight" in sd:
        sd["head.weight"] = sd.pop("head.fc.weight").flatten(1)
        sd["head.bias"] = sd.pop("head.fc.bias")
    return sd


def infer_bit_config(sd: Mapping[str, torch.Tensor]) -> BiTConfig:
    """The BiTConfig of a state dict in vit.bit naming; the resolution is not in the weights (224 assumed)."""
    depths: dict[int, set[int]] = {}
    for k in sd:
        if m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", k):
            depths.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    root, in_chans = sd["stem.conv.weight"].shape[:2]
    base, factor = (64, root // 64) if root % 64 == 0 else (root, 1)
    head = sd.get("head.weight")
    layers = tuple(len(depths[s]) for s in sorted(depths))
    return BiTConfig(layers, factor, 0 if head is None else head.shape[0], in_chans=in_chans, base_width=base)


def _read_bit(sd: StateDict, meta: dict[str, Any], source: str) -> tuple[StateDict, BiTConfig, dict[str, Any]]:
    """A BiT weights file: timm naming converted, a recorded config checked against the tensors' shapes."""
    sd = convert_timm_bit(sd)
    inferred = infer_bit_config(sd)
    if "config" not in meta:
        return sd, inferred, {**meta, "format": "torch"}
    recorded = config_from_dict(meta["config"])

    def shape(c: BiTConfig) -> tuple:
        return c.layers, c.num_classes, c.in_chans, c.num_features

    if not isinstance(recorded, BiTConfig) or shape(recorded) != shape(inferred):
        raise CheckpointError(f"{source}: the recorded model config does not match the BiT tensors")
    return sd, recorded, meta


# --------------------------------------------------------------------------------------------------------------
# Architecture inference


def infer_config(sd: Mapping[str, torch.Tensor], num_heads: int | None = None) -> ViTConfig:
    """The ViTConfig a state dict in vit's naming was made for (shapes say everything but the head count)."""
    try:
        dim = sd["pos_embed"].shape[-1]
        patch = sd["patch_embed.proj.weight"].shape[-1]
        in_chans = sd["patch_embed.proj.weight"].shape[1]
        mlp_dim = sd["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"not a ViT state dict: missing {e}") from None
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    pooling = "token" if "cls_token" in sd else "gap"
    grid_tokens = sd["pos_embed"].shape[1] - (1 if pooling == "token" else 0)
    side = int(round(grid_tokens**0.5))
    if side * side != grid_tokens:
        raise CheckpointError(f"position embedding has {grid_tokens} grid entries: not a square grid")
    resnet_layers: tuple[int, ...] = ()
    resnet_width = 1
    if "patch_embed.backbone.conv_root.weight" in sd:
        stages: dict[int, set[int]] = {}
        for k in sd:
            if m := re.match(r"patch_embed\.backbone\.stages\.(\d+)\.(\d+)\.", k):
                stages.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        resnet_layers = tuple(len(stages[s]) for s in sorted(stages))
        resnet_width = sd["patch_embed.backbone.conv_root.weight"].shape[0] // 64
        in_chans = sd["patch_embed.backbone.conv_root.weight"].shape[1]
    head = sd.get("head.weight")
    representation = sd["pre_logits.fc.weight"].shape[0] if "pre_logits.fc.weight" in sd else None
    cfg = ViTConfig(
        patch_size=patch,
        hidden_size=dim,
        depth=depth,
        num_heads=num_heads or _guess_heads(dim, depth, mlp_dim),
        mlp_dim=mlp_dim,
        num_classes=0 if head is None else head.shape[0],
        in_chans=in_chans,
        representation_size=representation,
        pooling=pooling,
        resnet_layers=resnet_layers,
        resnet_width=resnet_width,
    )
    stride = cfg.total_stride
    return ViTConfig.from_dict({**cfg.to_dict(), "image_size": (side * stride, side * stride)})


def _registered(**shape: Any) -> ViTConfig | None:
    """The first registered variant whose config has these field values."""
    from vit.configs import list_models

    for name in (n for n in list_models() if not is_bit(n)):
        c = model_config(name)
        if all(getattr(c, k) == v for k, v in shape.items()):
            return c
    return None


def _guess_heads(dim: int, depth: int, mlp_dim: int) -> int:
    """Head count of the registered variant with these shapes; else 64-dim heads as in every paper variant."""
    c = _registered(hidden_size=dim, depth=depth, mlp_dim=mlp_dim)
    return c.num_heads if c else max(dim // 64, 1)


def official_dropout(cfg: ViTConfig) -> float | None:
    """The fine-tuning dropout of the registered variant with this architecture (vit_jax configs/models.py:
    0.1 for L/16, H/14 and the R50 hybrids), or None for an architecture that is not registered."""
    c = _registered(
        patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size,
        depth=cfg.depth,
        mlp_dim=cfg.mlp_dim,
        resnet_layers=cfg.resnet_layers,
    )
    return c.dropout if c else None


# --------------------------------------------------------------------------------------------------------------
# Strict loading


def load_state_dict_strict(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load all-or-nothing; one error naming every missing, unexpected and mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys: {missing[:12]}" + (" ..." if len(missing) > 12 else ""))
        if unexpected:
            parts.append(f"unexpected keys: {unexpected[:12]}" + (" ..." if len(unexpected) > 12 else ""))
        if wrong:
            parts.append(f"wrong shapes: {wrong[:12]}")
        raise CheckpointError(f"{source} does not fit the model; " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)


# --------------------------------------------------------------------------------------------------------------
# vitflow's own format: safetensors + JSON metadata in the header


def save_checkpoint(
    uri: str | os.PathLike, model: nn.Module | Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None
) -> None:
    """Write weights as safetensors, atomically, with JSON metadata (model config, step, spec hash, ...)."""
    from safetensors.torch import save

    meta = dict(metadata or {})
    if isinstance(model, VisionTransformer | ResNetV2):
        meta.setdefault("config", model.cfg.to_dict())
    tensors = {k: v.detach().contiguous().cpu() for k, v in _state_dict(model).items()}
    storage.write_bytes(str(uri), save(tensors, metadata={METADATA_KEY: json.dumps(meta)}))


def load_checkpoint(uri: str | os.PathLike) -> tuple[StateDict, dict[str, Any]]:
    """Read a checkpoint: safetensors (with vitflow metadata if present) or ``.pt``/``.pth`` weights only.

    Pickled objects are never executed: ``torch.load(weights_only=True)`` refuses them. Other files are refused.
    """
    source = str(uri)
    suffix = Path(source.split("?")[0]).suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:  # safetensors checks the header (size, JSON, offsets within the file) before reading any tensor
            with safe_open(storage.fetch(source), framework="pt") as f:
                meta_json = (f.metadata() or {}).get(METADATA_KEY)
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - not a dict
        except SafetensorError as e:
            raise CheckpointError(f"{source}: not a valid safetensors file (truncated or forged?): {e}") from None
        return tensors, json.loads(meta_json) if meta_json else {}
    if suffix in (".pt", ".pth", ".bin"):
        try:
            obj = torch.load(storage.fetch(source), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ...
            raise CheckpointError(f"{source}: refused: not a plain weights file ({type(e).__name__}: {e})") from None
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
            raise CheckpointError(f"{source}: expected a mapping of tensor names to tensors")
        return dict(obj), {}
    raise CheckpointError(f"{source}: unsupported checkpoint type {suffix or '(none)'}; use .npz, .safetensors, .pt")


# --------------------------------------------------------------------------------------------------------------
# One entry point for any supported file


def read_any(path_or_uri: str | os.PathLike) -> tuple[StateDict, ViTConfig | BiTConfig, dict[str, Any]]:
    """State dict (vit naming), inferred or recorded config, and metadata of any supported checkpoint file."""
    source = str(path_or_uri)
    storage.validate_uri(source)
    if Path(source.split("?")[0]).suffix.lower() == ".npz":
        arrays = _read_npz(source)  # once: the state dict and the head count both come from it
        sd = _npz_state_dict(arrays, source)
        if is_bit_state_dict(sd):
            return sd, infer_bit_config(sd), {"format": "npz"}
        return sd, infer_config(sd, _npz_heads(arrays)), {"format": "npz"}
    sd, meta = load_checkpoint(source)
    if is_bit_state_dict(sd):
        return _read_bit(sd, meta, source)
    if "config" in meta:
        cfg = ViTConfig.from_dict(meta["config"])
        _check_recorded_config(cfg, infer_config(sd, cfg.num_heads), source)
        return sd, cfg, meta
    sd = to_vit_naming(sd)
    cfg = infer_config(sd)
    # timm and torchvision models use exact GELU; keep their numerics unless told otherwise.
    return sd, ViTConfig.from_dict({**cfg.to_dict(), "gelu_approximate": "none"}), {**meta, "format": "torch"}


def _check_recorded_config(recorded: ViTConfig, inferred: ViTConfig, source: str) -> None:
    """Refuse metadata that disagrees with the tensors' shapes before a model is built from it: a forged config
    (say depth 10,000 or width 65,536) would otherwise allocate a huge model only to fail the strict load."""
    fields = ("patch_size", "hidden_size", "depth", "mlp_dim", "num_classes", "representation_size", "pooling")
    wrong = [
        f"{f} {getattr(recorded, f)} vs {getattr(inferred, f)}"
        for f in fields
        if getattr(recorded, f) != getattr(inferred, f)
    ]
    if wrong:
        raise CheckpointError(f"{source}: the recorded model config does not match the tensors: {', '.join(wrong)}")


def load_pretrained(
    path_or_uri: str | os.PathLike,
    num_classes: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    **create_model_overrides: Any,
) -> VisionTransformer | ResNetV2:
    """Build the right model from any supported file (architecture inferred from the file) and load it strictly.

    ``num_classes`` drops the pre-logits layer and attaches a zero-initialised head (paper §3.2); ``image_size``
    resamples the position embeddings as the official code does. Other keyword arguments (``dropout``,
    ``gelu_approximate``, ...) override the inferred config. Without ``dropout`` a registered architecture gets
    its official fine-tuning rate (:func:`official_dropout`): a file records the rate it was trained with, or
    none at all (.npz), and neither is the rate to transfer with. ``path_or_uri`` may be a local path, ``s3://``
    or ``https://`` (downloaded once to the cache).
    """
    sd, cfg, _ = read_any(path_or_uri)
    if isinstance(cfg, BiTConfig):
        create_model_overrides = bit_options(create_model_overrides)
    elif create_model_overrides.get("dropout") is None and (rate := official_dropout(cfg)) is not None:
        create_model_overrides = {**create_model_overrides, "dropout": rate}
    if create_model_overrides:
        cfg = config_from_dict({**cfg.to_dict(), **create_model_overrides})
    model = ResNetV2(cfg) if isinstance(cfg, BiTConfig) else VisionTransformer(cfg)
    load_state_dict_strict(model, sd, str(path_or_uri))
    if num_classes is not None:
        model.reset_classifier(num_classes)
    if image_size is not None:
        model.set_image_size(image_size)
    return model
