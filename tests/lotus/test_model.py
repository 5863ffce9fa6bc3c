import json

import pytest
import torch

from lotus import LotusError
from lotus.model import build, count_sparsity, data_config, with_masks
from lotus.prune import magnitude_masks

CFG = dict(
    model="lotus_vit", pretrained=False, checkpoint=None, patch_size=4, embed_dim=32, depth=2, heads=2, mlp_ratio=2.0
)


def test_build_default_and_kept_patches():
    m = build(CFG, num_classes=5, img_size=16)
    x = torch.randn(3, 3, 16, 16)
    assert m(x).shape == (3, 5)
    assert m(x, keep_idx=torch.tensor([[0, 3]] * 3)).shape == (3, 5)
    assert m.patch_scores(x).shape == (3, 16)


def test_default_model_data_config_is_timms():
    # lotus_vit's data config goes through timm's resolver like any pretrained model's
    conf = data_config(build(CFG, 5, 16), {})
    assert conf["input_size"] == [3, 16, 16] and conf["crop_pct"] == 1.0
    assert conf["mean"] == pytest.approx([0.4914, 0.4822, 0.4465]) and conf["std"][0] == pytest.approx(0.2470)
    assert data_config(build(CFG, 5, 16), {"crop_pct": 0.5})["crop_pct"] == 0.5


def test_timm_vit_keeps_its_size_and_config():
    cfg = dict(CFG, model="vit_tiny_patch16_224")
    m = build(cfg, 10, None)
    conf = data_config(m, {})
    assert conf["input_size"] == [3, 224, 224] and conf["mean"] == [0.5, 0.5, 0.5]
    assert conf["interpolation"] == "bicubic" and conf["crop_pct"] == 0.9
    assert data_config(build(cfg, 10, 64), {})["input_size"] == [3, 64, 64]
    with pytest.raises(LotusError, match="not a multiple of .* patch size 16"):
        build(cfg, 10, 100)
    with pytest.raises(LotusError, match="ResNet, expected a timm VisionTransformer"):
        build(dict(CFG, model="resnet18"), 10, None)


def test_checkpoint_roundtrip_and_errors(tmp_path):
    m = build(CFG, 5, 16)
    p = tmp_path / "ck.pt"
    torch.save({"model": m.state_dict()}, p)
    m2 = build(dict(CFG, checkpoint=str(p)), 5, 16)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])
    torch.manual_seed(3)
    m7 = build(dict(CFG, checkpoint=str(p)), 7, 16)  # a classifier for other labels: the body loads, a new head
    assert m7.head.out_features == 7
    assert torch.equal(m7.blocks[0].attn.qkv.weight, m.blocks[0].attn.qkv.weight)
    torch.manual_seed(3)
    assert torch.equal(m7.head.weight, build(CFG, 7, 16).head.weight)  # the fresh model's own head
    wide = tmp_path / "wide.pt"
    torch.save(build(dict(CFG, embed_dim=48), 5, 16).state_dict(), wide)
    with pytest.raises(LotusError, match="does not match the model"):
        build(dict(CFG, checkpoint=str(wide)), 5, 16)  # another width: not this model
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(LotusError, match="cannot read"):
        build(dict(CFG, checkpoint=str(bad)), 5, 16)
    torch.save({"weights": [1, 2]}, bad)
    with pytest.raises(LotusError, match="holds no state_dict"):
        build(dict(CFG, checkpoint=str(bad)), 5, 16)
    with pytest.raises(LotusError, match="file not found"):
        build(dict(CFG, checkpoint=str(tmp_path / "none.pt")), 5, 16)
    with pytest.raises(LotusError, match="does not divide"):
        build(dict(CFG, patch_size=5), 5, 16)
    with pytest.raises(LotusError, match="no model"):
        build(dict(CFG, model="no_such_vit"), 5, 16)


def test_checkpoint_data_config_file_and_hub_directory(tmp_path):
    from safetensors.torch import save_file

    m = build(CFG, 5, 16)
    conf = {"mean": [0.1, 0.2, 0.3], "std": [0.9, 0.8, 0.7], "interpolation": "bicubic", "crop_pct": 0.75}
    p = tmp_path / "ck.pt"
    torch.save({"state_dict": m.state_dict(), "pretrained_cfg": conf}, p)
    got = data_config(build(dict(CFG, checkpoint=str(p)), 5, 16), {})
    assert got["mean"] == conf["mean"] and got["std"] == conf["std"] and got["crop_pct"] == 0.75
    assert got["input_size"] == [3, 16, 16]  # the model's size, whatever the checkpoint says
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, hub / "model.safetensors")
    (hub / "config.json").write_text(json.dumps({"architecture": "x", "pretrained_cfg": conf}))
    m3 = build(dict(CFG, checkpoint=str(hub)), 5, 16)
    assert torch.equal(m3.pos_embed, m.pos_embed) and data_config(m3, {})["std"] == conf["std"]
    (hub / "model.safetensors").unlink()
    with pytest.raises(LotusError, match="holds none of model.safetensors"):
        build(dict(CFG, checkpoint=str(hub)), 5, 16)


def test_masks_apply_with_sparsify():
    m = build(CFG, 5, 16)
    masks = magnitude_masks(m, 0.4)
    assert abs(count_sparsity(masks) - 0.4) < 1e-3
    with_masks(m, masks)
    from lotus_kernels.nn import MaskedLinear

    layers = [n for n, x in m.named_modules() if isinstance(x, MaskedLinear)]
    assert set(layers) == set(masks) and "head" not in layers
