"""Bad input to the data / model / training options: one line on stderr, exit 2, nothing written."""

import pytest
import timm
import torch

from lotus.cli import main

from ._tiny import TINY, make_image_folder, make_npz


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    make_npz(root / "d.npz")
    make_image_folder(root / "imgs", per_class=(2, 2, 2, 2))  # from scratch: source classes 0-1, target 2-3
    (root / "empty").mkdir()
    for c in "ab":
        (root / "broken" / c).mkdir(parents=True)
        (root / "broken" / c / "x.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "cifar" / "cifar-10-batches-py").mkdir(parents=True)
    (root / "cifar" / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"junk")
    # a ViT of another width: its shapes do not match vit_tiny_patch16_224
    torch.save(
        timm.create_model("vit_tiny_patch16_224", embed_dim=96, num_heads=3, depth=1).state_dict(), root / "wide.pt"
    )
    (root / "hub").mkdir()
    (root / "hub" / "config.json").write_text('{"pretrained_cfg": {}}')
    return root


CASES = [
    (["--data", "{r}/empty"], "--data: .*is not a usable ImageFolder"),
    (["--data", "{r}/broken"], "--data: cannot decode image"),
    (["--data", "cifar10", "--data-root", "{r}/cifar"], "--data cifar10: cannot load CIFAR-10"),
    (
        ["--data", "{r}/imgs", "--model", "vit_tiny_patch16_224", "--checkpoint", "{r}/wide.pt"],
        "--checkpoint: .*does not match the model",
    ),
    (
        ["--data", "{r}/imgs", "--model", "vit_tiny_patch16_224", "--checkpoint", "{r}/hub"],
        "--checkpoint: directory .* holds none of",
    ),
    (["--data", "{r}/imgs", "--model", "resnet18"], "--model: resnet18 is a ResNet, expected a timm VisionTransformer"),
    (
        ["--data", "{r}/imgs", "--model", "vit_tiny_patch16_224", "--img-size", "100"],
        "--img-size: 100 is not a multiple",
    ),
    (["--data", "{r}/d.npz", "--img-size", "0"], "--img-size: expected a positive size"),
    (["--data", "{r}/d.npz", "--workers", "-1"], "--workers: expected at least 0"),
    (["--data", "{r}/d.npz", "--batch-size", "0"], "--batch-size: expected at least 1"),
    (["--data", "{r}/d.npz", "--crop-pct", "1.5"], r"argument --crop-pct: expected a number in \(0, 1\]"),
    (["--data", "{r}/d.npz", "--clip-grad", "-1"], "--clip-grad: expected a norm >= 0"),
    (["--data", "{r}/d.npz", "--limit", "1"], "--limit: expected at least 2"),
    (["--data", "{r}/d.npz", "--optimizer", "lion"], "argument --optimizer: invalid choice"),
]


@pytest.mark.parametrize(
    "args, match", CASES, ids=[c[1].split(":")[0].split(" ")[0] + f"-{i}" for i, c in enumerate(CASES)]
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, inputs, args, match):
    out = tmp_path / "run"
    argv = ["run", *TINY, *[a.format(r=inputs) for a in args], "--out", str(out)]  # the case wins
    before = sorted(p.relative_to(inputs) for p in inputs.rglob("*"))
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lotus: error: ") and "Traceback" not in err, err
    assert __import__("re").search(match, err), err
    assert not out.exists()
    assert sorted(p.relative_to(inputs) for p in inputs.rglob("*")) == before  # no download, no cache
