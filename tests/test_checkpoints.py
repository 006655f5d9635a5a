"""Checkpoints: parity with timm and torchvision, the official .npz layouts, exports, our format, bad files."""

from __future__ import annotations

import functools
import http.server
import json
import pickle
import struct
import threading

import numpy as np
import pytest
import timm
import torch
import torchvision
from timm.models.vision_transformer import _load_weights as timm_load_npz

import vit
from tests.helpers import images, randomize_
from vit.checkpoints import (
    CheckpointError,
    convert_timm,
    convert_torchvision,
    export_npz,
    export_timm,
    export_torchvision,
    load_checkpoint,
    load_npz,
    load_state_dict_strict,
    save_checkpoint,
)
from vit.model import create_model

SIZE = 64


def timm_tiny(num_classes: int = 10) -> torch.nn.Module:
    return randomize_(
        timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, img_size=SIZE)
    ).eval()


def ours_tiny(**kw) -> vit.VisionTransformer:
    return create_model("vit_ti_16", image_size=SIZE, gelu_approximate="none", **kw).eval()


def official_arrays_from_timm(model: torch.nn.Module, heads: int, pre_logits: torch.nn.Linear | None = None) -> dict:
    """The official vision_transformer .npz layout (paper-facts §12.2), written independently of vit's code."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    dim = sd["pos_embed"].shape[-1]
    out = {
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b, p = f"Transformer/encoderblock_{i}", f"blocks.{i}"
        out[f"{b}/LayerNorm_0/scale"], out[f"{b}/LayerNorm_0/bias"] = sd[f"{p}.norm1.weight"], sd[f"{p}.norm1.bias"]
        out[f"{b}/LayerNorm_2/scale"], out[f"{b}/LayerNorm_2/bias"] = sd[f"{p}.norm2.weight"], sd[f"{p}.norm2.bias"]
        qkv_w, qkv_b = sd[f"{p}.attn.qkv.weight"], sd[f"{p}.attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            out[f"{b}/MultiHeadDotProductAttention_1/{n}/kernel"] = qkv_w[j * dim : (j + 1) * dim].T.reshape(
                dim, heads, dim // heads
            )
            out[f"{b}/MultiHeadDotProductAttention_1/{n}/bias"] = qkv_b[j * dim : (j + 1) * dim].reshape(heads, -1)
        out[f"{b}/MultiHeadDotProductAttention_1/out/kernel"] = sd[f"{p}.attn.proj.weight"].T.reshape(
            heads, dim // heads, dim
        )
        out[f"{b}/MultiHeadDotProductAttention_1/out/bias"] = sd[f"{p}.attn.proj.bias"]
        for j, fc in enumerate(("fc1", "fc2")):
            out[f"{b}/MlpBlock_3/Dense_{j}/kernel"] = sd[f"{p}.mlp.{fc}.weight"].T
            out[f"{b}/MlpBlock_3/Dense_{j}/bias"] = sd[f"{p}.mlp.{fc}.bias"]
    if pre_logits is not None:
        out["pre_logits/kernel"] = pre_logits.weight.detach().numpy().T
        out["pre_logits/bias"] = pre_logits.bias.detach().numpy()
    return out


def write_npz(path, arrays: dict) -> str:
    np.savez(path, **arrays)
    return str(path)


def to_big_vision(arrays: dict, scan: bool = False) -> dict:
    """Linen numbering, ``params/`` prefix, top-level posemb without a class-token entry (folded into cls)."""
    out = {}
    for key, value in arrays.items():
        key = (
            key.replace("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0")
            .replace("LayerNorm_2", "LayerNorm_1")
            .replace("MlpBlock_3", "MlpBlock_0")
        )
        out[key] = value
    pos = out.pop("Transformer/posembed_input/pos_embedding")
    out["cls"] = out["cls"] + pos[:, :1]
    out["pos_embedding"] = pos[:, 1:]
    if scan:
        blocks = sorted(
            {k.split("/")[1] for k in out if k.startswith("Transformer/encoderblock_")},
            key=lambda s: int(s.split("_")[1]),
        )
        for rest in {k.split("/", 2)[2] for k in out if k.startswith("Transformer/encoderblock_0/")}:
            out[f"Transformer/encoderblock/{rest}"] = np.stack([out.pop(f"Transformer/{b}/{rest}") for b in blocks])
    return {f"params/{k}": v for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------------


def test_timm_parity():
    ref = timm_tiny()
    ours = ours_tiny(num_classes=10)
    load_state_dict_strict(ours, convert_timm(ref.state_dict()))
    x = images(2, SIZE)
    assert ref(x).abs().max() > 0.1
    assert (ours(x) - ref(x)).abs().max().item() < 1e-4


def test_torchvision_parity_and_export():
    ref = randomize_(torchvision.models.VisionTransformer(SIZE, 16, 12, 3, 192, 768, num_classes=10)).eval()
    ours = ours_tiny(num_classes=10)
    load_state_dict_strict(ours, convert_torchvision(ref.state_dict()))
    x = images(2, SIZE)
    assert (ours(x) - ref(x)).abs().max().item() < 1e-4
    back = torchvision.models.VisionTransformer(SIZE, 16, 12, 3, 192, 768, num_classes=10).eval()
    back.load_state_dict(export_torchvision(ours))
    assert (back(x) - ours(x)).abs().max().item() < 1e-6


def test_torchvision_representation_layer_round_trip(tmp_path):
    ref = randomize_(
        torchvision.models.VisionTransformer(SIZE, 16, 2, 3, 192, 768, num_classes=7, representation_size=32)
    ).eval()
    path = tmp_path / "tv.pth"
    torch.save(ref.state_dict(), path)
    ours = vit.load_pretrained(path).eval()
    assert ours.cfg.representation_size == 32 and ours.cfg.depth == 2 and ours.cfg.num_classes == 7
    x = images(2, SIZE)
    assert (ours(x) - ref(x)).abs().max().item() < 1e-4


def test_timm_export_round_trip():
    ours = randomize_(ours_tiny(num_classes=10))
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=SIZE).eval()
    ref.load_state_dict(export_timm(ours))
    x = images(2, SIZE)
    # float32 rounding only: our patch embedding is a GEMM, timm's a strided conv (outputs are O(1))
    assert (ref(x) - ours(x)).abs().max().item() < 1e-5


def test_official_npz_loads_and_matches_timm(tmp_path):
    ref = timm_tiny()
    path = write_npz(tmp_path / "ViT-Ti_16.npz", official_arrays_from_timm(ref, heads=3))
    ours = vit.load_pretrained(path, gelu_approximate="none").eval()
    assert ours.cfg.num_heads == 3 and ours.cfg.depth == 12 and ours.cfg.image_size == (SIZE, SIZE)
    x = images(2, SIZE)
    assert (ours(x) - ref(x)).abs().max().item() < 1e-4
    timm_ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=SIZE).eval()
    timm_load_npz(timm_ref, path)  # timm's own reader agrees on the layout
    assert (timm_ref(x) - ours(x)).abs().max().item() < 1e-4


def test_an_npz_is_read_once_and_a_safetensors_file_through_a_memory_map(tmp_path, monkeypatch):
    """Loading reads an official ``.npz`` once (state dict and head count from the same arrays), and a
    safetensors file by memory-mapping it in safetensors' own reader, never through Python's file reads."""
    import builtins
    from pathlib import Path

    npz = write_npz(tmp_path / "ViT-Ti_16.npz", official_arrays_from_timm(timm_tiny(), heads=3))
    loads = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda file, *a, **k: loads.append(str(file)) or real_load(file, *a, **k))
    vit.load_pretrained(npz)
    assert loads == [str(npz)]

    model = randomize_(create_model("vit_micro_4", image_size=32, num_classes=3))
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, {"step": 1})
    real_open, real_read_bytes = builtins.open, Path.read_bytes

    def refuse_reads(file, *args, **kwargs):
        assert Path(str(file)).name != path.name, "the safetensors file was opened by Python"
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refuse_reads)
    monkeypatch.setattr(Path, "read_bytes", lambda self: refuse_reads(self) and real_read_bytes(self))
    sd, meta = load_checkpoint(path)
    assert meta["step"] == 1 and torch.equal(sd["head.weight"], model.state_dict()["head.weight"])


def test_original_i21k_file_with_pre_logits_and_zeroed_head(tmp_path):
    ref = timm_tiny(num_classes=21843)
    torch.nn.init.zeros_(ref.head.weight)
    torch.nn.init.zeros_(ref.head.bias)
    pre = randomize_(torch.nn.Linear(192, 192))
    arrays = official_arrays_from_timm(ref, heads=3, pre_logits=pre)
    arrays["head/kernel"] = np.zeros((192, 21843), np.float32)
    path = write_npz(tmp_path / "ViT-Ti_16.npz", arrays)
    model = vit.load_pretrained(path)
    assert model.cfg.representation_size == 192 and model.cfg.num_classes == 21843
    x = images(2, SIZE)
    feats = model.forward_pre_logits(x)
    assert feats.abs().max() <= 1.0  # tanh pre-logits
    fine = vit.load_pretrained(path, num_classes=10, image_size=96)
    assert isinstance(fine.pre_logits, torch.nn.Identity)
    assert fine.head.weight.shape == (10, 192) and torch.count_nonzero(fine.head.weight) == 0
    assert fine.grid_size == (6, 6) and fine(images(1, 96)).shape == (1, 10)


@pytest.mark.parametrize("scan", [False, True])
def test_big_vision_layout_equals_original_layout(tmp_path, scan):
    arrays = official_arrays_from_timm(timm_tiny(), heads=3)
    original = vit.load_pretrained(write_npz(tmp_path / "a.npz", arrays)).eval()
    bv = vit.load_pretrained(write_npz(tmp_path / "b.npz", to_big_vision(arrays, scan=scan))).eval()
    x = images(2, SIZE)
    assert (original(x) - bv(x)).abs().max().item() < 1e-5


def test_opt_target_prefix(tmp_path):
    arrays = official_arrays_from_timm(timm_tiny(), heads=3)
    path = write_npz(tmp_path / "c.npz", {f"opt/target/{k}": v for k, v in arrays.items()})
    assert set(load_npz(path)) == set(create_model("vit_ti_16", num_classes=10).state_dict())


@pytest.mark.parametrize(
    ("timm_name", "ours_name"), [("vit_base_r50_s16_224", "r50_vit_b_16"), ("vit_large_r50_s32_224", "r50_vit_l_32")]
)
def test_hybrid_npz_matches_timm_port(tmp_path, timm_name, ours_name):
    ours = randomize_(create_model(ours_name, image_size=96, num_classes=5, gelu_approximate="none", depth=2)).eval()
    with torch.no_grad():  # weight standardisation ignores scale; large kernels make the eps conventions moot
        for conv in ours.patch_embed.backbone.modules():
            if isinstance(conv, torch.nn.Conv2d):
                conv.weight.mul_(1e4)
    path = tmp_path / "R50+ViT.npz"
    export_npz(ours, path)
    arrays = dict(np.load(path))
    for key in [k for k in arrays if "/gn" in k]:  # older files store GroupNorm params as (1, 1, 1, C)
        arrays[key] = arrays[key].reshape(1, 1, 1, -1)
    write_npz(path, arrays)
    loaded = vit.load_pretrained(str(path), gelu_approximate="none").eval()
    assert loaded.cfg.resnet_layers == ours.cfg.resnet_layers
    ref = timm.create_model(timm_name, pretrained=False, num_classes=5, img_size=96, depth=2).eval()
    timm_load_npz(ref, str(path))
    for module in ref.modules():  # timm's port uses other epsilons: GroupNorm 1e-5, eps inside the std's sqrt
        if isinstance(module, torch.nn.GroupNorm):
            module.eps = 1e-6
        elif type(module).__name__ == "StdConv2dSame":
            module.eps = 1e-12
    x = images(2, 96).double()  # float64: a deep ResNet's float32 rounding would hide nothing but blur the check
    loaded, ref = loaded.double(), ref.double()
    assert ref(x).abs().max() > 0.05
    assert (loaded(x) - ref(x)).abs().max().item() < 1e-5


def test_save_and_load_checkpoint_round_trip(tmp_path):
    model = randomize_(create_model("vit_micro_4", image_size=32, num_classes=3))
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, {"step": 17, "spec_hash": "abc"})
    sd, meta = load_checkpoint(path)
    assert meta["step"] == 17 and meta["spec_hash"] == "abc" and meta["config"]["hidden_size"] == 64
    loaded = vit.load_pretrained(path)
    assert loaded.cfg == model.cfg
    torch.testing.assert_close(loaded.eval()(images(2, 32)), model.eval()(images(2, 32)))


def test_plain_pt_state_dict_from_timm_loads(tmp_path):
    ref = timm_tiny()
    path = tmp_path / "timm.pth"
    torch.save(ref.state_dict(), path)
    ours = vit.load_pretrained(path).eval()
    assert ours.cfg.gelu_approximate == "none"
    x = images(2, SIZE)
    assert (ours(x) - ref(x)).abs().max().item() < 1e-4


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        torch.save({"weight": torch.zeros(1), "x": _Payload(str(marker))}, f)
    with pytest.raises(CheckpointError, match="evil.pt: refused"):
        load_checkpoint(path)
    assert not marker.exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(CheckpointError, match="refused"):
        vit.load_pretrained(raw)
    assert not marker.exists()


def test_npz_with_object_arrays_refused(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, embedding=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="pickled objects"):
        load_npz(path)


def test_truncated_files_refused(tmp_path):
    model = create_model("vit_micro_4", image_size=32, num_classes=3)
    good = tmp_path / "m.safetensors"
    save_checkpoint(good, model)
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "cut.safetensors")
    (tmp_path / "absurd.safetensors").write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(CheckpointError, match="header too large"):
        load_checkpoint(tmp_path / "absurd.safetensors")
    npz = tmp_path / "m.npz"
    export_npz(model, npz)
    (tmp_path / "cut.npz").write_bytes(npz.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="not a readable .npz"):
        load_npz(tmp_path / "cut.npz")


def test_wrong_shapes_and_keys_are_named():
    model = create_model("vit_micro_4", image_size=32, num_classes=3)
    sd = model.state_dict()
    sd["head.weight"] = torch.zeros(4, 64)
    del sd["norm.bias"]
    sd["blocks.0.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_state_dict_strict(model, sd, "file.safetensors")
    message = str(err.value)
    assert "file.safetensors" in message and "norm.bias" in message and "blocks.0.extra" in message
    assert "head.weight: file (4, 64) vs model (3, 64)" in message


def test_unknown_extension_and_layout_refused(tmp_path):
    (tmp_path / "weights.ckpt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported checkpoint type .ckpt"):
        vit.load_pretrained(tmp_path / "weights.ckpt")
    bad = tmp_path / "other.npz"
    np.savez(bad, **{"embedding/kernel": np.zeros((4, 4, 3, 8)), "weird/thing": np.zeros(2)})
    with pytest.raises(CheckpointError):
        load_npz(bad)
    timm_extra = dict(timm_tiny().state_dict())
    timm_extra["fc_norm.weight"] = torch.ones(192)
    with pytest.raises(CheckpointError, match="fc_norm"):
        convert_timm(timm_extra)


def test_load_over_https_and_s3_is_cached(tmp_path, s3_bucket, monkeypatch):
    model = randomize_(create_model("vit_micro_4", image_size=32, num_classes=3))
    served = tmp_path / "served"
    served.mkdir()
    save_checkpoint(served / "m.safetensors", model)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/m.safetensors"
        a = vit.load_pretrained(url)
        (served / "m.safetensors").unlink()  # a second load comes from the cache
        b = vit.load_pretrained(url)
    finally:
        httpd.shutdown()
    torch.testing.assert_close(a.state_dict(), b.state_dict())
    save_checkpoint(f"{s3_bucket}/ckpt/m.safetensors", model)
    c = vit.load_pretrained(f"{s3_bucket}/ckpt/m.safetensors", num_classes=6)
    assert c.head.weight.shape == (6, 64)


def test_metadata_is_plain_json(tmp_path):
    model = create_model("vit_micro_4", image_size=32, num_classes=3)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, {"step": 3})
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    assert json.loads(header["__metadata__"]["vitflow"])["step"] == 3
