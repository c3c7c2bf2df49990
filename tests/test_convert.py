"""arcface_torch backbone.pth -> dcq checkpoint -> backbone.pth, and fine-tuning with init_from.

The arcface_torch networks are written out below from insightface's
recognition/arcface_torch/backbones (module names, shapes and forward order), without any dcq code,
so a renamed or reordered layer on the dcq side shows up as a failed load or a different embedding.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from dcq.checkpoint import build_eval_encoder, load_checkpoint
from dcq.train.rundir import latest_checkpoint
from dcq.cli import main
from dcq.convert import to_arcface
from dcq.errors import DcqError
from dcq.train.config import build_config
from dcq.train.loop import Trainer, train


# -- arcface_torch's iresnet.py --------------------------------------------------------------------
class ArcIBasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class ArcIResNet(nn.Module):
    fc_scale = 7 * 7

    def __init__(self, layers, num_features=512):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-05)
        self.prelu = nn.PReLU(64)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1])
        self.layer3 = self._make_layer(256, layers[2])
        self.layer4 = self._make_layer(512, layers[3])
        self.bn2 = nn.BatchNorm2d(512, eps=1e-05)
        self.dropout = nn.Dropout(p=0.0, inplace=True)
        self.fc = nn.Linear(512 * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def _make_layer(self, planes, blocks, stride=2):
        downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False),
                                   nn.BatchNorm2d(planes, eps=1e-05))
        layers = [ArcIBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [ArcIBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)
        return self.features(self.fc(self.dropout(x)))


# -- arcface_torch's mobilefacenet.py ----------------------------------------------------------------
class ArcConvBlock(nn.Module):
    def __init__(self, in_c, out_c, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups=1):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(in_c, out_c, kernel, groups=groups, stride=stride, padding=padding,
                                              bias=False), nn.BatchNorm2d(out_c), nn.PReLU(out_c))

    def forward(self, x):
        return self.layers(x)


class ArcLinearBlock(nn.Module):
    def __init__(self, in_c, out_c, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups=1):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
                                    nn.BatchNorm2d(out_c))

    def forward(self, x):
        return self.layers(x)


class ArcDepthWise(nn.Module):
    def __init__(self, in_c, out_c, residual=False, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=1):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ArcConvBlock(in_c, groups),
            ArcConvBlock(groups, groups, groups=groups, kernel=kernel, padding=padding, stride=stride),
            ArcLinearBlock(groups, out_c))

    def forward(self, x):
        return x + self.layers(x) if self.residual else self.layers(x)


class ArcResidual(nn.Module):
    def __init__(self, c, num_block, groups):
        super().__init__()
        self.layers = nn.Sequential(*[ArcDepthWise(c, c, True, (3, 3), (1, 1), (1, 1), groups)
                                      for _ in range(num_block)])

    def forward(self, x):
        return self.layers(x)


class ArcFlatten(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


class ArcGDC(nn.Module):
    def __init__(self, embedding_size):
        super().__init__()
        self.layers = nn.Sequential(ArcLinearBlock(512, 512, groups=512, kernel=(7, 7)), ArcFlatten(),
                                    nn.Linear(512, embedding_size, bias=False), nn.BatchNorm1d(embedding_size))

    def forward(self, x):
        return self.layers(x)


class ArcMobileFaceNet(nn.Module):
    def __init__(self, num_features=512, blocks=(1, 4, 6, 2), scale=2):
        super().__init__()
        s = scale
        self.layers = nn.ModuleList([
            ArcConvBlock(3, 64 * s, kernel=(3, 3), stride=(2, 2), padding=(1, 1)),
            ArcConvBlock(64 * s, 64 * s, kernel=(3, 3), stride=(1, 1), padding=(1, 1), groups=64),
            ArcDepthWise(64 * s, 64 * s, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=128),
            ArcResidual(64 * s, num_block=blocks[1], groups=128),
            ArcDepthWise(64 * s, 128 * s, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=256),
            ArcResidual(128 * s, num_block=blocks[2], groups=256),
            ArcDepthWise(128 * s, 128 * s, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=512),
            ArcResidual(128 * s, num_block=blocks[3], groups=256),
        ])
        self.conv_sep = ArcConvBlock(128 * s, 512)
        self.features = ArcGDC(num_features)

    def forward(self, x):
        for func in self.layers:
            x = func(x)
        return self.features(self.conv_sep(x))


# -- arcface_torch's vit.py (inference path: no masking, no stochastic depth) -------------------------
class ArcVitBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.attn.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, 4 * dim)
        self.mlp.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        h = self.norm1(x)
        qkv = self.attn.qkv(h).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(dim=-1)
        x = x + self.attn.proj((attn @ qkv[2]).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp.fc2(torch.clamp(self.mlp.fc1(self.norm2(x)), 0, 6))


class ArcViT(nn.Module):
    def __init__(self, num_classes=512, embed_dim=256, depth=12, num_heads=8, img_size=112, patch_size=9):
        super().__init__()
        n = (img_size // patch_size) ** 2
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, n, embed_dim) * 0.02)
        self.blocks = nn.ModuleList([ArcVitBlock(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.feature = nn.Sequential(nn.Linear(embed_dim * n, embed_dim, bias=False),
                                     nn.BatchNorm1d(embed_dim, eps=2e-5),
                                     nn.Linear(embed_dim, num_classes, bias=False),
                                     nn.BatchNorm1d(num_classes, eps=2e-5))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.n, self.d = n, embed_dim

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.feature(torch.reshape(self.norm(x), (x.shape[0], self.n * self.d)))


def arcface_model(arch, num_features=512):
    torch.manual_seed(0)
    model = {"r18": lambda: ArcIResNet((2, 2, 2, 2), num_features), "mbf": lambda: ArcMobileFaceNet(num_features),
             "vit_t": lambda: ArcViT(num_features)}[arch]()
    with torch.no_grad():  # trained-looking normalisation: nothing an identity layer would hide
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.8, 1.2)
                m.bias.normal_(0, 0.1)
                m.num_batches_tracked.fill_(1234)
            elif isinstance(m, (nn.PReLU, nn.LayerNorm)):
                m.weight.uniform_(0.1, 0.4) if isinstance(m, nn.PReLU) else m.weight.uniform_(0.8, 1.2)
    return model.eval()


def cosine(a, b):
    return nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


@pytest.mark.parametrize("arch", ["r18", "mbf", "vit_t"])
def test_arcface_backbone_converts_to_dcq_and_back(tmp_path, capsys, arch):
    ref = arcface_model(arch)
    torch.save(ref.state_dict(), tmp_path / "backbone.pth")  # as train_v2.py saves it
    x = torch.rand(3, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        expected = ref(x)

    assert main(["convert", str(tmp_path / "backbone.pth"), str(tmp_path / "model.pt"), "--arch", arch]) == 0
    encoder, info = build_eval_encoder(load_checkpoint(tmp_path / "model.pt"))
    assert info == {"which": "feature_extractor", "backbone": arch, "embedding_size": 512, "image_size": 112}
    with torch.no_grad():
        assert cosine(encoder(x), expected).min() >= 0.99999

    assert main(["convert", str(tmp_path / "model.pt"), str(tmp_path / "back.pth")]) == 0
    assert f"get_model('{arch}', num_features=512)" in capsys.readouterr().out
    back = arcface_model(arch)
    for p in back.parameters():
        p.data.zero_()
    back.load_state_dict(torch.load(tmp_path / "back.pth", weights_only=True), strict=True)
    original = ref.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in back.state_dict().items())
    with torch.no_grad():
        assert cosine(back.eval()(x), expected).min() >= 0.99999


def test_other_wrappings_of_a_backbone_are_read(tmp_path):
    """arcface_torch's resume file (checkpoint_gpu_0.pt) and a state_dict taken from the DDP wrapper."""
    state = arcface_model("mbf", num_features=128).state_dict()
    torch.save({"epoch": 3, "global_step": 10, "state_dict_backbone": state}, tmp_path / "checkpoint_gpu_0.pt")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pth")
    for name in ("checkpoint_gpu_0.pt", "ddp.pth"):
        assert main(["convert", str(tmp_path / name), str(tmp_path / f"{name}.dcq.pt"), "--arch", "mbf"]) == 0
        ckpt = load_checkpoint(tmp_path / f"{name}.dcq.pt")
        assert ckpt["model"] == {"backbone": "mbf", "embedding_size": 128, "image_size": 112}
        assert torch.equal(ckpt["feature_extractor"]["features.layers.2.weight"], state["features.layers.2.weight"])


def error_line(capsys, *argv):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_a_file_that_does_not_fit_names_the_key(tmp_path, capsys):
    torch.save(arcface_model("r18").state_dict(), tmp_path / "r18.pth")
    err = error_line(capsys, "convert", tmp_path / "r18.pth", tmp_path / "o.pt", "--arch", "r34")
    assert "key 'layer1.2.bn1.weight' is missing" in err and "pass --arch r18" in err
    err = error_line(capsys, "convert", tmp_path / "r18.pth", tmp_path / "o.pt")
    assert "name its architecture with --arch (it fits r18)" in err
    state = arcface_model("mbf").state_dict()
    state["features.layers.2.weight"] = torch.zeros(512, 256)
    torch.save(state, tmp_path / "bad.pth")
    err = error_line(capsys, "convert", tmp_path / "bad.pth", tmp_path / "o.pt", "--arch", "mbf")
    assert "key 'features.layers.2.weight' has shape (512, 256) where mbf has (512, 512)" in err
    torch.save({**state, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    err = error_line(capsys, "convert", tmp_path / "extra.pth", tmp_path / "o.pt", "--arch", "mbf")
    assert "key 'extra.weight' is not part of mbf" in err
    torch.save([1, 2, 3], tmp_path / "list.pth")
    assert "neither a dcq checkpoint nor a state_dict" in error_line(
        capsys, "convert", tmp_path / "list.pth", tmp_path / "o.pt", "--arch", "mbf")
    assert "does not exist" in error_line(capsys, "convert", tmp_path / "none.pth", tmp_path / "o.pt")
    assert not (tmp_path / "o.pt").exists()


def _dcq_checkpoint(path, backbone, size, dim=16):
    from dcq.checkpoint import save_checkpoint
    from dcq.models import get_backbone

    net = get_backbone(backbone, embedding_size=dim, image_size=size)
    return save_checkpoint(path, {"model": {"backbone": backbone, "embedding_size": dim, "image_size": size},
                                  "feature_extractor": net.state_dict(), "weight_generator": None})


def test_dcq_models_arcface_torch_cannot_load_are_refused(tmp_path, capsys):
    _dcq_checkpoint(tmp_path / "cpu.pt", "cpunet", 32)
    assert "arcface_torch has no model for" in error_line(capsys, "convert", tmp_path / "cpu.pt", tmp_path / "o.pth")
    _dcq_checkpoint(tmp_path / "small.pt", "iresnet18", 64)
    assert "takes 112 px only" in error_line(capsys, "convert", tmp_path / "small.pt", tmp_path / "o.pth")
    assert not (tmp_path / "o.pth").exists()


# -- init_from ------------------------------------------------------------------------------------------
def tiny(data, out, **over):
    values = {"backbone": "mbf", "embedding_size": 32, "image_size": 32, "batch_size": 32, "train_data": str(data),
              "output": str(out), "lr": 0.1, "max_steps": 16, "workers": 0, "log_every": 1, "progress": False,
              "checkpoint_every": 0, "queue_size": 16, "scale": 30.0, "margin": 0.2, "generator_momentum": 0.5,
              "threads": 1, "schedule": "cosine",
              "in_batch_negatives": True}  # the first step's queue is empty: its negatives are the batch
    values.update(over)
    return build_config(values, "test")


@pytest.fixture(scope="module")
def pretrained(tiny_dataset, tmp_path_factory):
    """mbf trained for 20 steps, saved as an arcface_torch backbone.pth, and that file converted back."""
    root = tmp_path_factory.mktemp("pretrain")
    summary = train(tiny(tiny_dataset, root / "run", max_steps=20))
    ckpt = load_checkpoint(summary["final"])
    torch.save(to_arcface(ckpt["weight_generator"], "mbf"), root / "backbone.pth")
    assert main(["convert", str(root / "backbone.pth"), str(root / "converted.pt"), "--arch", "mbf"]) == 0
    return root


def first_loss(out):
    return json.loads((Path(out) / "steps.jsonl").read_text().splitlines()[0])["loss"]


def test_fine_tune_from_a_converted_checkpoint_starts_lower(pretrained, tiny_dataset, tmp_path):
    scratch = tmp_path / "scratch"
    train(tiny(tiny_dataset, scratch, max_steps=1, seed=1))
    for source in ("converted.pt", "backbone.pth"):
        out = tmp_path / source
        train(tiny(tiny_dataset, out, max_steps=1, seed=1, init_from=str(pretrained / source)))
        assert "init_from: feature extractor and weight generator start from" in (out / "train.log").read_text()
        assert first_loss(out) < first_loss(scratch) - 1.0, (first_loss(out), first_loss(scratch))


def test_init_from_sets_both_encoders_and_a_fresh_head(pretrained, tiny_dataset, tmp_path):
    state = torch.load(pretrained / "backbone.pth", weights_only=True)
    for source in ("backbone.pth", "converted.pt"):
        trainer = Trainer(tiny(tiny_dataset, tmp_path / source, init_from=str(pretrained / source)))
        try:
            online = trainer.model.feature_extractor.state_dict()
            generator = trainer.model.weight_generator.encoder.state_dict()
            assert all(torch.equal(v, generator[k]) and torch.equal(v, state[k]) for k, v in online.items())
            assert trainer.head.queue.filled == 0
        finally:
            trainer.close()


def test_a_resumed_run_ignores_init_from(pretrained, tiny_dataset, tmp_path):
    step = latest_checkpoint(pretrained / "run")
    saved = load_checkpoint(step)["feature_extractor"]
    missing = tiny(tiny_dataset, tmp_path / "a", max_steps=21, init_from=str(tmp_path / "gone.pth"))
    trainer = Trainer(missing, resume=str(step))  # never read: the checkpoint's weights win
    try:
        weights = trainer.model.feature_extractor.state_dict()
        assert trainer.step == 20 and all(torch.equal(v, saved[k]) for k, v in weights.items())
        assert any("init_from" in note and "not read" in note for note in trainer._notes)
    finally:
        trainer.close()
    (tmp_path / "b").mkdir()
    shutil.copy(step, tmp_path / "b" / step.name)
    other = tiny(tiny_dataset, tmp_path / "b", max_steps=21, init_from=str(pretrained / "converted.pt"))
    trainer = Trainer(other, resume="auto")  # an elastic restart that finds a checkpoint: it wins too
    try:
        weights = trainer.model.feature_extractor.state_dict()
        assert trainer.step == 20 and all(torch.equal(v, saved[k]) for k, v in weights.items())
        assert not torch.equal(saved["conv_sep.layers.0.weight"],
                               torch.load(pretrained / "backbone.pth")["conv_sep.layers.0.weight"])
    finally:
        trainer.close()


def test_init_from_errors_are_one_line(pretrained, tiny_dataset, tmp_path, capsys):
    base = ["train", "--set", "backbone=mbf", "--set", "image_size=32", "--set", f"train_data={tiny_dataset}",
            "--set", "workers=0", "--set", "progress=false", "--set", "max_steps=1", "--set", "batch_size=8"]

    def train_error(out, **over):
        sets = [a for k, v in over.items() for a in ("--set", f"{k}={v}")]
        return error_line(capsys, *base, "--set", f"output={tmp_path / out}", *sets)

    assert "does not exist" in train_error("a", init_from=tmp_path / "none.pth", embedding_size=32)
    err = train_error("b", init_from=pretrained / "backbone.pth", embedding_size=64)
    assert "is a mbf with 32-d embeddings at 32 px" in err and "set embedding_size=32" in err
    err = train_error("c", init_from=pretrained / "converted.pt", embedding_size=32, image_size=64)
    assert "holds a mbf with 32-d embeddings at 32 px" in err
    err = train_error("d", init_from=pretrained / "backbone.pth", embedding_size=32, backbone="r18", image_size=32)
    assert "not an arcface_torch r18 state_dict" in err and "set backbone=mbf" in err
    with pytest.raises(DcqError, match="init_from=.* is a folder"):
        tiny(tiny_dataset, tmp_path / "e", init_from=str(tmp_path))
