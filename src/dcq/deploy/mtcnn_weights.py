"""Where the face detector's weights come from and where their ONNX export is kept. No torch here.

The weights are MTCNN's three networks as shipped inside the facenet-pytorch 2.6.0 wheel (MIT
licence): ``pip install --no-deps facenet-pytorch==2.6.0`` (``make install`` does it). That package
pins an older torch and needs torchvision, so it is never imported: its files are found through
its installed metadata (`importlib.metadata`), which executes none of its code, and checked
against the sha256 of the 2.6.0 files. They are exported once to ONNX (with torch, by
`dcq.deploy.mtcnn_nets`) into the cache folder, ``$DCQ_CACHE/mtcnn-2.6.0`` (default
``~/.cache/dcq``, or ``$XDG_CACHE_HOME/dcq``), each file written atomically; from then on
detection needs only numpy, Pillow and onnxruntime, and a machine without torch can be given a
copy of that folder.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from dcq.errors import DcqError

PACKAGE = "facenet-pytorch"
VERSION = "2.6.0"
INSTALL = f"pip install --no-deps {PACKAGE}=={VERSION}"
CACHE_ENV = "DCQ_CACHE"
NAMES = ("pnet", "rnet", "onet")
SHA256 = {
    "pnet": "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f",
    "rnet": "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86",
    "onet": "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d",
}


def cache_folder() -> Path:
    """The folder the ONNX export lives in: ``$DCQ_CACHE/mtcnn-2.6.0`` (default ``~/.cache/dcq/...``)."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = str(Path(xdg) / "dcq") if xdg else str(Path.home() / ".cache" / "dcq")
    return Path(root).expanduser() / f"mtcnn-{VERSION}"


def onnx_files(folder: Path | None = None) -> dict[str, Path]:
    folder = cache_folder() if folder is None else Path(folder)
    return {name: folder / f"{name}.onnx" for name in NAMES}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shipped_weights() -> dict[str, Path]:
    """The three ``.pt`` files of the installed facenet-pytorch wheel, checked by their sha256."""
    from importlib import metadata

    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise DcqError(f"the face detector's weights are not installed: {INSTALL} (or `make install`)") from None
    files = {name: Path(str(dist.locate_file(f"facenet_pytorch/data/{name}.pt"))) for name in NAMES}
    for name, path in files.items():
        if not path.is_file():
            raise DcqError(f"{path}: missing from the installed {PACKAGE} {dist.version}; "
                           f"{INSTALL.replace('--no-deps', '--no-deps --force-reinstall')}")
        if _sha256(path) != SHA256[name]:
            raise DcqError(f"{path}: not the {name} weights of {PACKAGE} {VERSION} (installed: {dist.version}); "
                           f"{INSTALL.replace('--no-deps', '--no-deps --force-reinstall')}")
    return files


def export_to(folder: Path) -> dict[str, Path]:
    """Export the shipped weights to ONNX files in ``folder`` (needs torch); their paths."""
    try:
        from dcq.deploy.mtcnn_nets import export_onnx, load_net
    except ImportError:
        raise DcqError(f"the face detector's ONNX files are not in {folder} and torch, needed once to make them, "
                       f"is not installed; run `dcq detect --prepare` where torch is, and copy that folder here "
                       f"(or set {CACHE_ENV})") from None
    weights = shipped_weights()
    paths = onnx_files(folder)
    for name, path in paths.items():
        export_onnx(load_net(name, weights[name]), name, path,
                    {"dcq.detector": "mtcnn", "dcq.weights": f"{PACKAGE}=={VERSION} {name}.pt",
                     "dcq.weights_sha256": SHA256[name]})
    return paths


def detector_files(folder: Path | None = None) -> dict[str, Path]:
    """The three ONNX files, exported now when the cache does not hold them yet."""
    folder = cache_folder() if folder is None else Path(folder)
    paths = onnx_files(folder)
    if all(p.is_file() for p in paths.values()):
        return paths
    return export_to(folder)
