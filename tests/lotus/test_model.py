import pytest
import torch

from lotus import LotusError
from lotus.model import build, count_sparsity, with_masks
from lotus.prune import magnitude_masks

CFG = dict(model="lotus_vit", pretrained=False, checkpoint=None, patch_size=4, embed_dim=32, depth=2, heads=2,
           mlp_ratio=2.0)


def test_build_default_and_kept_patches():
    m = build(CFG, num_classes=5, img_size=16)
    x = torch.randn(3, 3, 16, 16)
    assert m(x).shape == (3, 5)
    assert m(x, keep_idx=torch.tensor([[0, 3]] * 3)).shape == (3, 5)
    assert m.patch_scores(x).shape == (3, 16)


def test_checkpoint_roundtrip_and_errors(tmp_path):
    m = build(CFG, 5, 16)
    p = tmp_path / "ck.pt"
    torch.save({"model": m.state_dict()}, p)
    m2 = build(dict(CFG, checkpoint=str(p)), 5, 16)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])
    with pytest.raises(LotusError, match="does not match the model"):
        build(dict(CFG, checkpoint=str(p)), 7, 16)  # head of another size
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(LotusError, match="cannot read"):
        build(dict(CFG, checkpoint=str(bad)), 5, 16)
    with pytest.raises(LotusError, match="file not found"):
        build(dict(CFG, checkpoint=str(tmp_path / "none.pt")), 5, 16)
    with pytest.raises(LotusError, match="does not divide"):
        build(dict(CFG, patch_size=5), 5, 16)
    with pytest.raises(LotusError, match="no model"):
        build(dict(CFG, model="no_such_vit"), 5, 16)


def test_masks_apply_with_sparsify():
    m = build(CFG, 5, 16)
    masks = magnitude_masks(m, 0.4)
    assert abs(count_sparsity(masks) - 0.4) < 1e-3
    with_masks(m, masks)
    from lotus_kernels.nn import MaskedLinear
    layers = [n for n, x in m.named_modules() if isinstance(x, MaskedLinear)]
    assert set(layers) == set(masks) and "head" not in layers
