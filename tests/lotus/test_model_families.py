"""``--model tv:NAME / hf:DIR / open_clip:NAME``: models built from local weights, their data config
from the model's own config, the pipeline's surface (logits, kept patches, scores, patch dropout)."""

import json

import pytest
import torch

from lotus import LotusError
from lotus.model import build, data_config

from ._tiny import TINY, make_npz

CFG = dict(pretrained=False, checkpoint=None, patch_size=4, embed_dim=32, depth=2, heads=2, mlp_ratio=2.0)


def check_surface(m, classes, size):
    n = m.patch_embed.num_patches
    x = torch.randn(2, 3, size, size)
    assert m.eval()(x).shape == (2, classes)
    assert m(x, keep_idx=torch.tensor([[0, 3], [1, 2]])).shape == (2, classes)
    assert m.patch_scores(x).shape == (2, n)
    from timm.layers import PatchDropout

    m.train().patch_drop = PatchDropout(0.5, num_prefix_tokens=m.num_prefix_tokens)
    seen = []
    blocks = [
        mod
        for name, mod in m.named_modules()
        if name.endswith("layers.0") or name.endswith("resblocks.0") or name.endswith("encoder_layer_0")
    ]
    h = blocks[0].register_forward_pre_hook(lambda mod, a: seen.append(a[0].shape[1]))
    m(x)
    h.remove()
    assert seen == [m.num_prefix_tokens + n // 2]  # timm PatchDropout's count, through the kept path
    check_classifier_surface(m.eval(), x)


def check_classifier_surface(m, x):
    """timm's classifier methods, which the linear probe uses: pre-logits features + head = logits,
    and a fresh classifier for other labels."""
    with torch.no_grad():
        f = m.forward_features(x)
        assert f.shape == (x.shape[0], m.get_classifier().in_features)
        torch.testing.assert_close(m.forward_head(f), m(x))
        assert m.forward_head(f, pre_logits=True) is f
        m.reset_classifier(6)
        assert m(x).shape == (x.shape[0], 6) and m.get_classifier().out_features == 6


def hf_dir(tmp_path, kind="vit", labels=3):
    transformers = pytest.importorskip("transformers")
    common = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=4
    )
    if kind == "vit":
        model = transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=labels, **common))
    else:
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**common))
    path = tmp_path / kind
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_mean": [0.4, 0.4, 0.4],
                "image_std": [0.2, 0.2, 0.2],
                "resample": 3,
                "do_center_crop": True,
                "size": {"shortest_edge": 20},
                "crop_size": {"height": 16, "width": 16},
            }
        )
    )
    return path, model


def test_hf_directory_loads_its_weights_config_and_normalisation(tmp_path):
    path, saved = hf_dir(tmp_path)
    m = build(dict(CFG, model=f"hf:{path}"), 5, None)  # 5 labels: a fresh classifier, the body loaded
    assert torch.equal(m.net.vit.layers[0].mlp.fc1.weight, saved.vit.layers[0].mlp.fc1.weight)
    assert m.net.classifier.out_features == 5
    conf = data_config(m, {})
    assert conf["input_size"] == [3, 16, 16] and conf["mean"] == [0.4, 0.4, 0.4] and conf["std"] == [0.2] * 3
    assert conf["interpolation"] == "bicubic" and conf["crop_pct"] == pytest.approx(0.8)
    check_surface(m, 5, 16)
    # another size: the model's own position-embedding interpolation
    m24 = build(dict(CFG, model=f"hf:{path}"), 5, 24)
    assert m24.patch_embed.num_patches == 36 and m24.eval()(torch.randn(1, 3, 24, 24)).shape == (1, 5)


def test_hf_clip_tower_gets_a_linear_head(tmp_path):
    path, _ = hf_dir(tmp_path, "clip")
    m = build(dict(CFG, model=f"hf:{path}"), 4, None)
    assert m.head.out_features == 4
    check_surface(m, 4, 16)


def test_torchvision_builder_checkpoint_and_config(tmp_path):
    m = build(dict(CFG, model="tv:vit_b_32"), 3, None)
    p = tmp_path / "tv.pt"
    torch.save(m.net.state_dict(), p)
    m2 = build(dict(CFG, model="tv:vit_b_32", checkpoint=str(p)), 7, None)  # other labels: a fresh head
    w = m.net.encoder.layers[0].mlp[0].weight
    assert torch.equal(m2.net.encoder.layers[0].mlp[0].weight, w) and m2.net.heads.head.out_features == 7
    conf = data_config(m2, {})
    assert conf["input_size"] == [3, 224, 224] and conf["crop_pct"] == pytest.approx(224 / 256)
    assert conf["mean"] == pytest.approx([0.485, 0.456, 0.406]) and conf["interpolation"] == "bilinear"
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert m2.eval()(x, keep_ratio=0.25).shape == (1, 7)
    check_classifier_surface(m2, x)
    with pytest.raises(LotusError, match="--img-size: tv:vit_b_32 runs at its own size 224"):
        build(dict(CFG, model="tv:vit_b_32"), 3, 160)
    with pytest.raises(LotusError, match="--model: torchvision has no model 'nope'"):
        build(dict(CFG, model="tv:nope"), 3, None)
    with pytest.raises(LotusError, match="tv:resnet18 is a ResNet, expected a torchvision VisionTransformer"):
        build(dict(CFG, model="tv:resnet18"), 3, None)


def test_open_clip_config_and_local_checkpoint(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    cfgdir = tmp_path / "cfg"
    cfgdir.mkdir()
    (cfgdir / "lotus-tiny-ViT.json").write_text(
        json.dumps(
            {
                "embed_dim": 16,
                "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 16, "patch_size": 4},
                "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
            }
        )
    )
    open_clip.add_model_config(cfgdir)
    ref = open_clip.create_model("lotus-tiny-ViT")
    p = tmp_path / "oc.pt"
    torch.save({"state_dict": ref.state_dict()}, p)
    m = build(dict(CFG, model="open_clip:lotus-tiny-ViT", checkpoint=str(p)), 3, None)
    assert torch.equal(m.net.conv1.weight, ref.visual.conv1.weight)
    conf = data_config(m, {})
    assert conf["input_size"] == [3, 16, 16] and conf["mean"] == pytest.approx(list(open_clip.OPENAI_DATASET_MEAN))
    check_surface(m, 3, 16)
    with pytest.raises(LotusError, match="open_clip has no model config 'nope'"):
        build(dict(CFG, model="open_clip:nope"), 3, None)


@pytest.mark.slow  # a whole tiny `lotus run` (~40 s)
def test_lotus_run_with_a_transformers_model(tmp_path):
    from lotus.cli import main

    path, _ = hf_dir(tmp_path)
    data = make_npz(tmp_path / "d.npz")
    args = [a for a in TINY]
    for flag in ("--embed-dim", "--depth", "--heads", "--mlp-ratio"):
        i = args.index(flag)
        del args[i : i + 2]
    main(["run", "--data", str(data), "--out", str(tmp_path / "run"), "--model", f"hf:{path}", *args])
    assert "model `hf:" in (tmp_path / "run" / "report.md").read_text()
