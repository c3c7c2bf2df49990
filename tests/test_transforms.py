"""decode_image / to_tensor / Train- and EvalTransform: the pixel contract every model relies on."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dcq.data import EvalTransform, TrainTransform, decode_image, to_tensor
from dcq.errors import DcqError


def _encode(img: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def _ramp(h=12, w=10) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_decode_png_exact_rgb():
    img = _ramp()
    out = decode_image(_encode(img))
    assert out.dtype == np.uint8 and out.shape == (12, 10, 3)
    np.testing.assert_array_equal(out, img)


def test_decode_grayscale_and_rgba_become_rgb():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    out = decode_image(_encode(gray))
    assert out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out[..., 0], gray)
    np.testing.assert_array_equal(out[..., 2], gray)
    rgba = np.dstack([_ramp(8, 8), np.full((8, 8), 7, np.uint8)])
    np.testing.assert_array_equal(decode_image(_encode(rgba)), rgba[..., :3])


def test_decode_resizes_only_when_size_differs():
    img = _ramp(16, 16)
    np.testing.assert_array_equal(decode_image(_encode(img), 16), decode_image(_encode(img)))  # no resampling
    np.testing.assert_array_equal(decode_image(_encode(img), 16), img)
    small = decode_image(_encode(img), 8)
    assert small.shape == (8, 8, 3)
    # area resampling: each output pixel is the mean of a 2x2 block
    block = img.reshape(8, 2, 8, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(small.astype(np.float64) - block).max() <= 1.0
    assert decode_image(_encode(img, "JPEG"), 24).shape == (24, 24, 3)


def test_decode_accepts_arrays_and_rejects_garbage():
    img = _ramp(8, 8)
    np.testing.assert_array_equal(decode_image(img), img)
    assert decode_image(img, 4).shape == (4, 4, 3)
    with pytest.raises(DcqError, match="cannot decode image .*record 3"):
        decode_image(b"\xff\xd8 definitely not a jpeg", where="x.rec record 3 at byte 16")
    with pytest.raises(DcqError, match="uint8"):
        decode_image(img.astype(np.float32))
    with pytest.raises(DcqError):
        decode_image(12345)


def test_to_tensor_range_and_layout():
    img = np.zeros((2, 3, 3), np.uint8)
    img[0, 0] = (0, 255, 128)
    t = to_tensor(img)
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    assert t[0, 0, 0] == -1.0 and t[1, 0, 0] == 1.0
    assert abs(float(t[2, 0, 0]) - (128 - 127.5) / 127.5) < 1e-7
    batch = to_tensor(np.stack([img, img]))
    assert batch.shape == (2, 3, 2, 3)
    torch.testing.assert_close(batch[1], t)


def test_eval_transform_matches_decode_plus_to_tensor():
    img = _ramp(16, 16)
    data = _encode(img)
    t = EvalTransform(8)(data)
    assert t.shape == (3, 8, 8)
    torch.testing.assert_close(t, to_tensor(decode_image(data, 8)))


def test_train_transform_flips_about_half_the_time_and_is_seeded():
    img = _ramp(6, 6)
    plain = to_tensor(img)
    flipped = plain.flip(-1)
    tr = TrainTransform(6, seed=123)
    outs = [tr(img) for _ in range(400)]
    n_flip = sum(bool(torch.equal(o, flipped)) for o in outs)
    n_plain = sum(bool(torch.equal(o, plain)) for o in outs)
    assert n_flip + n_plain == 400
    assert 150 < n_flip < 250  # binomial(400, 0.5): sd 10
    tr2 = TrainTransform(6, seed=123)
    assert all(torch.equal(a, tr2(img)) for a in outs[:50])
    no_flip = TrainTransform(6, flip=False)
    assert all(torch.equal(no_flip(img), plain) for _ in range(20))


def test_train_transform_global_rng_follows_manual_seed():
    img = _ramp(6, 6)
    tr = TrainTransform(6)
    torch.manual_seed(5)
    a = [tr(img) for _ in range(30)]
    torch.manual_seed(5)
    b = [tr(img) for _ in range(30)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
