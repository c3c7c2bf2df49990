"""The three MTCNN networks (Zhang et al. 2016) in torch, only to load the shipped weights and export them.

MTCNN finds faces in three stages of growing cost: P-Net slides over an image pyramid and proposes
boxes, R-Net rejects most of them on 24x24 crops, O-Net scores 48x48 crops and places the five
landmarks. The layer names and shapes are those of the state dicts in facenet-pytorch's wheel
(``facenet_pytorch/data/{pnet,rnet,onet}.pt``), loaded strictly: every key used, every shape
matched. Those weights come from a port whose dense layers read the feature map in (width, height,
channel) order, so R-Net and O-Net flatten it that way.

Detection itself runs from ONNX files without torch (`dcq.deploy.detect`); this module is imported
only to export them (`export_onnx`, once, into the cache of `dcq.deploy.mtcnn_weights`) and by the
tests that hold the ONNX path equal to the torch one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dcq.deploy.mtcnn_interface import Networks
from dcq.errors import DcqError


def _conv(block: nn.Module, name: str, c_in: int, c_out: int, kernel: int) -> None:
    setattr(block, f"conv{name}", nn.Conv2d(c_in, c_out, kernel))
    setattr(block, f"prelu{name}", nn.PReLU(c_out))


def _flatten_whc(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, W*H*C) in the order the shipped dense weights expect."""
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class PNet(nn.Module):
    """Proposal net, fully convolutional: any (N, 3, H, W) -> face probability (N, H', W') and box
    offsets (N, 4, H', W'), one cell per 12x12 window at stride 2."""

    def __init__(self):
        super().__init__()
        _conv(self, "1", 3, 10, 3)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        _conv(self, "2", 10, 16, 3)
        _conv(self, "3", 16, 32, 3)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return torch.softmax(self.conv4_1(x), dim=1)[:, 1], self.conv4_2(x)


class RNet(nn.Module):
    """Refinement net: (N, 3, 24, 24) -> face probability (N,), box offsets (N, 4)."""

    def __init__(self):
        super().__init__()
        _conv(self, "1", 3, 28, 3)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        _conv(self, "2", 28, 48, 3)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        _conv(self, "3", 48, 64, 2)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu4(self.dense4(_flatten_whc(self.prelu3(self.conv3(x)))))
        return torch.softmax(self.dense5_1(x), dim=1)[:, 1], self.dense5_2(x)


class ONet(nn.Module):
    """Output net: (N, 3, 48, 48) -> face probability (N,), box offsets (N, 4), landmarks (N, 10):
    five x then five y, as fractions of the box."""

    def __init__(self):
        super().__init__()
        _conv(self, "1", 3, 32, 3)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        _conv(self, "2", 32, 64, 3)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        _conv(self, "3", 64, 64, 3)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        _conv(self, "4", 64, 128, 2)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu5(self.dense5(_flatten_whc(self.prelu4(self.conv4(x)))))
        return torch.softmax(self.dense6_1(x), dim=1)[:, 1], self.dense6_2(x), self.dense6_3(x)


NETS = {"pnet": PNet, "rnet": RNet, "onet": ONet}


def load_net(name: str, weights: Path) -> nn.Module:
    """The network ``name`` with the state dict at ``weights``, every key and shape checked."""
    net = NETS[name]()
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise DcqError(f"{weights}: cannot read the {name} weights ({str(exc).splitlines()[0][:120]}); "
                       "reinstall them: pip install --no-deps --force-reinstall facenet-pytorch==2.6.0") from None
    own = net.state_dict()
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if set(state) != set(own) or mismatched:
        raise DcqError(f"{weights}: not MTCNN {name} weights (missing {sorted(set(own) - set(state))}, unexpected "
                       f"{sorted(set(state) - set(own))}, other shapes {mismatched})")
    net.load_state_dict(state, strict=True)
    return net.eval()


def load_networks(weights: dict[str, Path]) -> dict[str, nn.Module]:
    return {name: load_net(name, path) for name, path in weights.items()}


# (input names, output names, dynamic axes) of each exported graph
_GRAPHS = {
    "pnet": (["image"], ["prob", "offsets"], {"image": {0: "n", 2: "h", 3: "w"}, "prob": {0: "n", 1: "hp", 2: "wp"},
                                               "offsets": {0: "n", 2: "hp", 3: "wp"}}),
    "rnet": (["crops"], ["prob", "offsets"], {"crops": {0: "n"}, "prob": {0: "n"}, "offsets": {0: "n"}}),
    "onet": (["crops"], ["prob", "offsets", "landmarks"],
             {"crops": {0: "n"}, "prob": {0: "n"}, "offsets": {0: "n"}, "landmarks": {0: "n"}}),
}
_EXAMPLE_SIZE = {"pnet": 32, "rnet": 24, "onet": 48}


def export_onnx(net: nn.Module, name: str, path: Path, metadata: dict[str, str]) -> None:
    """Write ``net`` as an ONNX graph (batch and, for P-Net, image size dynamic) to ``path``."""
    import io
    import warnings

    import onnx

    from dcq.atomic import atomic_write

    inputs, outputs, axes = _GRAPHS[name]
    example = torch.zeros(1, 3, _EXAMPLE_SIZE[name], _EXAMPLE_SIZE[name])
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notices
        torch.onnx.export(net, (example,), buffer, input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          opset_version=17, dynamo=False)
    model = onnx.load_from_string(buffer.getvalue())
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    atomic_write(path, lambda f: f.write(model.SerializeToString()))


class TorchNetworks(Networks):
    """The three networks run by torch: the reference the ONNX path is held to."""

    def __init__(self, weights: dict[str, Path]):
        self.nets = load_networks(weights)

    def _run(self, name: str, x):
        with torch.no_grad():
            return [out.numpy() for out in self.nets[name](torch.from_numpy(x))]
