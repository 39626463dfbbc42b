"""The chapter's models, layer for layer, and the registry."""

from __future__ import annotations

import pytest
import torch

from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.errors import PipelineError
from pipeline.models import MODELS, build_model, count_parameters

# Listings 5-7 and 5-10 of the chapter, verbatim.
CHAPTER_DNN = """FashionDNN(
  (fc1): Linear(in_features=784, out_features=256, bias=True)
  (drop): Dropout(p=0.25, inplace=False)
  (fc2): Linear(in_features=256, out_features=128, bias=True)
  (fc3): Linear(in_features=128, out_features=10, bias=True)
)"""
CHAPTER_CNN = """FashionCNN(
  (layer1): Sequential(
    (0): Conv2d(1, 32, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
    (1): BatchNorm2d(32, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
    (2): ReLU()
    (3): MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False)
  )
  (layer2): Sequential(
    (0): Conv2d(32, 64, kernel_size=(3, 3), stride=(1, 1))
    (1): BatchNorm2d(64, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
    (2): ReLU()
    (3): MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False)
  )
  (fc1): Linear(in_features=2304, out_features=600, bias=True)
  (drop): Dropout2d(p=0.25, inplace=False)
  (fc2): Linear(in_features=600, out_features=120, bias=True)
  (fc3): Linear(in_features=120, out_features=10, bias=True)
)"""


def normalise(text: str) -> str:
    # torch >= 2.6 added `bias=True` to BatchNorm's repr; the chapter predates it.
    return text.replace("affine=True, bias=True,", "affine=True,")


@pytest.mark.parametrize(("name", "listing"), [("dnn", CHAPTER_DNN), ("cnn", CHAPTER_CNN)])
def test_models_print_like_the_chapter(name, listing):
    assert normalise(repr(build_model(name))) == listing


def test_registry_and_unknown_name():
    assert set(MODELS) >= {"dnn", "cnn"}
    with pytest.raises(PipelineError, match="known models: cnn, cnn_plus, dnn"):
        build_model("resnet")


@pytest.mark.parametrize("name", ["dnn", "cnn", "cnn_plus"])
@pytest.mark.parametrize("batch", [1, 7])
def test_forward_shapes(name, batch):
    model = build_model(name).eval()
    assert model(torch.zeros(batch, 1, 28, 28)).shape == (batch, 10)


def test_cnn_flat_size_follows_input_shape():
    # 32x32 input: conv(pad 1) 32 -> pool 16 -> conv 14 -> pool 7, so 64*7*7.
    model = build_model("cnn", input_shape=(1, 32, 32))
    assert model.fc1.in_features == 64 * 7 * 7
    assert model.eval()(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    assert build_model("cnn").fc1.in_features == 64 * 6 * 6


def test_parameter_counts():
    assert count_parameters(build_model("dnn")) == 784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    assert count_parameters(build_model("cnn")) > count_parameters(build_model("dnn"))


def test_checkpoint_round_trip(tmp_path):
    model = build_model("cnn").eval()
    save_checkpoint(model, tmp_path / "m.pt", ["a"] * 10)
    loaded, names = load_checkpoint(tmp_path / "m.pt")
    x = torch.rand(3, 1, 28, 28)
    assert names == ["a"] * 10 and not loaded.training
    assert torch.equal(model(x), loaded(x))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="not a usable model checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


def test_cnn_plus_judges_each_image_with_its_mirror_and_trains_on_one_view():
    from pipeline.models import single_view

    torch.manual_seed(0)
    model = build_model("cnn_plus").eval()
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        views = (model.logits(x) + model.logits(x.flip(-1))) / 2
        assert torch.allclose(model(x), views, atol=1e-5)
        assert torch.allclose(model(x), model(x.flip(-1)), atol=1e-5)  # a mirror gets the same answer
        with single_view(model):
            assert torch.equal(model(x), model.logits(x))
        assert model.flip_averaged and torch.allclose(model(x), views, atol=1e-5)  # restored after
        model.train()
        torch.manual_seed(1)
        trained_view = model(x)
        torch.manual_seed(1)
        assert torch.equal(trained_view, model.logits(x))  # training sees each image as it is (dropout same)


def test_cnn_plus_starts_from_the_patches_directions_and_keeps_them():
    from torch.nn.functional import unfold

    from pipeline.models import whitening_filters

    torch.manual_seed(0)
    images = torch.rand(300, 1, 28, 28) ** 3  # skewed pixels: directions of unequal variance
    model = build_model("cnn_plus")
    model.initialise_from(images)
    first = model.first_conv
    fixed = model.fixed_filters
    assert fixed == 18 and first.out_channels == 32
    directions = whitening_filters(images, (3, 3)).flatten(1)
    assert torch.allclose(directions @ directions.T, torch.eye(9), atol=1e-4)  # orthonormal
    patches = unfold(images, 3).transpose(1, 2).flatten(0, 1)
    variance = (patches @ directions.T).pow(2).mean(0)
    assert torch.all(variance[:-1] >= variance[1:])  # most of the patches' variance first
    kept = first.weight[:fixed].detach().flatten(1)
    scale = kept[0].norm()
    assert torch.allclose(kept[:9] / scale, directions, atol=1e-4) and torch.allclose(kept[9:], -kept[:9])
    before = first.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.0)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images[:32]), torch.arange(32) % 10).backward()
        optimizer.step()
    assert torch.equal(first.weight[:fixed], before[:fixed])  # the directions stay as they started
    assert not torch.equal(first.weight[fixed:], before[fixed:])  # the other filters train
