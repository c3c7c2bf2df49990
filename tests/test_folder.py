"""Image-folder dataset numbering and open_dataset dispatch."""

import io

import numpy as np
import pytest
from PIL import Image

from dcq.data import FaceRecordIO, ImageFolderDataset, open_dataset
from dcq.data.recordio import write_face_recordio
from dcq.errors import DcqError


def _png(v: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), v, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _tree(root, spec):
    for ident, files in spec.items():
        d = root / ident
        d.mkdir(parents=True, exist_ok=True)
        for f, v in files:
            (d / f).write_bytes(_png(v))


def test_identities_numbered_in_sorted_name_order(tmp_path):
    _tree(tmp_path, {
        "zoe": [("b.jpg", 1), ("a.png", 2)],
        "Adam": [("1.JPEG", 3)],
        "bob": [("x.bmp", 4), ("y.jpg", 5), ("z.jpeg", 6)],
    })
    (tmp_path / "bob" / "notes.txt").write_text("ignored")
    (tmp_path / "bob" / ".hidden.jpg").write_bytes(b"ignored")
    (tmp_path / "empty").mkdir()
    ds = ImageFolderDataset(tmp_path)
    assert ds.identity_names == ["Adam", "bob", "zoe"]  # byte order: uppercase first; empty folder skipped
    assert ds.num_identities == 3 and len(ds) == 6
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 1, 1, 1, 2, 2]
    assert [p.split("/")[-1] for p in ds.paths] == ["1.JPEG", "x.bmp", "y.jpg", "z.jpeg", "a.png", "b.jpg"]
    assert ds.indices_of(2).tolist() == [4, 5] and ds.label(0) == 0
    assert ds.image_bytes(4) == _png(2)
    assert ds.image(1)[0, 0].tolist() == [4, 4, 4]
    assert ds[5] == (_png(1), 2)


def test_errors(tmp_path):
    with pytest.raises(DcqError, match="not found"):
        ImageFolderDataset(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    with pytest.raises(DcqError, match="no images found"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "a" / "bad.jpg").write_bytes(b"garbage")
    ds = ImageFolderDataset(tmp_path)
    with pytest.raises(DcqError, match=r"bad.jpg \(image 0\)"):
        ds.image(0)


def test_open_dataset_dispatch(tmp_path):
    write_face_recordio(tmp_path / "r", [(0, _png(1)), (1, _png(2))])
    assert isinstance(open_dataset(tmp_path / "r"), FaceRecordIO)
    assert isinstance(open_dataset(tmp_path / "r" / "train.rec"), FaceRecordIO)
    _tree(tmp_path / "f" / "train", {"a": [("0.jpg", 1)]})
    assert isinstance(open_dataset(tmp_path / "f"), ImageFolderDataset)
    assert open_dataset(tmp_path / "f" / "train").identity_names == ["a"]
    (tmp_path / "e").mkdir()
    with pytest.raises(DcqError, match="no train.rec"):
        open_dataset(tmp_path / "e")
    with pytest.raises(DcqError, match="dataset not found"):
        open_dataset(tmp_path / "missing")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DcqError, match="not a dataset"):
        open_dataset(tmp_path / "x.txt")
