"""Every bad input a user can give ends in exit code 2 and one `dcq <cmd>: error:` line naming the
problem: no traceback, and nothing written or changed in the output folder.

(Tests run as root, where a read-only folder does not stop a write; unwritable outputs are made
with a path whose parent is a regular file, and a full disk by a failing write.)"""

import argparse
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcq.checkpoint import save_checkpoint
from dcq.cli import main
from dcq.errors import DcqError, one_line
from dcq.models import get_backbone


def snapshot(folder: Path):
    if not folder.exists():
        return None
    return {p.relative_to(folder): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def assert_one_error(capsys, rc, needle, command):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"dcq {command}: error: ") and needle in lines[0], lines[0]
    assert "weights_only=False" not in err
    return lines[0]


def png_bytes(size=16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png() -> bytes:
    """A PNG header claiming 30000 x 30000 pixels (Pillow refuses it before decoding anything)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    net = get_backbone("cpunet", embedding_size=8, image_size=16)
    model = {"backbone": "cpunet", "embedding_size": 8, "image_size": 16}
    save_checkpoint(d / "ok.pt", {"model": model, "feature_extractor": net.state_dict(), "threshold": 0.3})
    save_checkpoint(d / "text_threshold.pt", {"model": model, "feature_extractor": net.state_dict(),
                                              "threshold": "high"})
    save_checkpoint(d / "unknown_backbone.pt", {"model": {**model, "backbone": "resnet9000"},
                                                "feature_extractor": net.state_dict()})
    save_checkpoint(d / "bad_size.pt", {"model": {"backbone": "iresnet18", "embedding_size": 8, "image_size": 40},
                                        "feature_extractor": net.state_dict()})
    torch.save(argparse.Namespace(payload="not plain data"), d / "hostile.pt")
    (d / "face.png").write_bytes(png_bytes())
    (d / "bomb.png").write_bytes(bomb_png())
    (d / "garbage.yaml").write_bytes(bytes(range(256)) * 4)
    (d / "a_file").write_text("a regular file")
    nested = d / "faces"
    for who in ("ann", "bob"):
        (nested / who).mkdir(parents=True)
        (nested / who / "1.png").write_bytes(png_bytes())
    (nested / "bob" / "more").mkdir()
    (nested / "bob" / "more" / "2.png").write_bytes(png_bytes())
    return d


TRAIN_CASES = [
    (["--set", "backbone=resnet9000"], "unknown backbone 'resnet9000'"),
    (["--set", "device=tpu9"], "unknown device 'tpu9'"),
    (["--set", "image_size=8"], "cpunet takes images of at least 16 px"),
    (["--set", "backbone=iresnet18", "--set", "image_size=40"], "iresnet18 takes image sizes divisible by 16"),
    (["--set", "milestones=[1,"], "milestones='[1,' is not a valid list"),
    (["--set", "eval_bins=[a"], "eval_bins='[a' is not a valid list"),
    (["--set", "batch_size=1"], "batch_size >= 2"),
    (["--set", "queue_size=1.5"], "queue_size='1.5' is not a valid int"),
    (["--set", "lr=nan"], "lr=nan must be"),
    (["--set", "margin=nan"], "margin=nan must be a finite number"),
    (["--set", "embedding_size=1e9"], "embedding_size=1000000000 is out of range; give 1 to 65,536"),
    (["--set", "backbone=iresnet18", "--set", "image_size=4096", "--set", "embedding_size=65536"], "need at least"),
    (["--set", "eval_bins=[missing.bin]"], "eval_bins entry missing.bin does not exist"),
    (["--set", "train_data=FACES"], "images in a sub-folder of identity 'bob'"),
    (["--set", "output=FILE"], "is a file, not a folder"),
]


@pytest.mark.parametrize("args, needle", TRAIN_CASES, ids=[" ".join(a) for a, _ in TRAIN_CASES])
def test_bad_training_input_is_one_line(tiny_dataset, files, tmp_path, capsys, args, needle):
    out = tmp_path / "run"
    args = [a.replace("FACES", str(files / "faces")).replace("FILE", str(files / "a_file")) for a in args]
    rc = main(["train", "--set", f"train_data={tiny_dataset}", "--set", f"output={out}", "--set", "workers=0",
               "--set", "batch_size=16", "--set", "queue_size=8", *args])
    assert_one_error(capsys, rc, needle, "train")
    assert snapshot(out) is None and (files / "a_file").read_text() == "a regular file"


def test_binary_config_file_is_one_line(files, capsys):
    rc = main(["train", str(files / "garbage.yaml"), "--print-config"])
    assert_one_error(capsys, rc, "is not UTF-8 text", "train")


OTHER_CASES = [
    (["verify", "ok.pt", "face.png", "face.png", "--threshold", "nan"], "--threshold nan", "verify"),
    (["verify", "text_threshold.pt", "face.png", "face.png"], "unusable threshold ('high')", "verify"),
    (["verify", "ok.pt", "bomb.png", "face.png"], "decompression-bomb", "verify"),
    (["verify", "hostile.pt", "face.png", "face.png"], "not a loadable dcq checkpoint", "verify"),
    (["eval", "unknown_backbone.pt", "--bin", "x.bin"], "--bin x.bin: file not found", "eval"),
    (["embed", "unknown_backbone.pt", "face.png", "--out", "OUT/e.npy"], "unknown backbone 'resnet9000'", "embed"),
    (["embed", "bad_size.pt", "face.png", "--out", "OUT/e.npy"], "divisible by 16", "embed"),
    (["embed", "ok.pt", "bomb.png", "--out", "OUT/e.npy"], "decompression-bomb", "embed"),
    (["embed", "ok.pt", "face.png", "--out", "a_file/e.npy"], "cannot write", "embed"),
    (["embed", "ok.pt", "face.png", "--out", "OUT"], "must end in .npy", "embed"),
    (["export", "ok.pt", "--onnx", "a_file/m.onnx"], "cannot write", "export"),
    (["export", "hostile.pt", "--onnx", "OUT/m.onnx"], "not a loadable dcq checkpoint", "export"),
]


@pytest.mark.parametrize("args, needle, command", OTHER_CASES, ids=[" ".join(a) for a, _, _ in OTHER_CASES])
def test_bad_evaluation_input_is_one_line(files, tmp_path, capsys, monkeypatch, args, needle, command):
    monkeypatch.chdir(files)
    out = tmp_path / "out"
    args = [a.replace("OUT", str(out)) for a in args]
    before = snapshot(files)
    assert_one_error(capsys, main(args), needle, command)
    assert snapshot(out) is None and snapshot(files) == before


def test_errors_from_dataloader_workers_keep_only_the_error_line():
    exc = DcqError("Caught DcqError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                   '  File "x.py", line 1, in f\n    raise DcqError("...")\n'
                   "dcq.errors.DcqError: cannot decode image (train.rec record 7): not a known image format\n")
    assert one_line(exc) == "cannot decode image (train.rec record 7): not a known image format"


def test_a_full_disk_is_one_line_and_leaves_no_file(tmp_path, monkeypatch):
    import shutil

    def full(obj, f, *args, **kwargs):
        f.write(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed\nunexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(DcqError, match="cannot write .*step_00000001.pt: the disk is full") as info:
        save_checkpoint(tmp_path / "step_00000001.pt", {"step": 1})
    assert "\n" not in str(info.value) and list(tmp_path.iterdir()) == []


def test_threads_far_beyond_the_cpus_are_clamped():
    from dcq.resources import set_threads

    before = torch.get_num_threads()
    try:
        assert 1 <= set_threads(100_000) <= 4096
    finally:
        torch.set_num_threads(before)
