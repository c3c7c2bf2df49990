"""decode_image / to_tensor / Train- and EvalTransform: the pixel contract every model relies on."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dcq.data import EvalTransform, TrainTransform, decode_image, normalize, to_chw_uint8, to_tensor
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


def test_normalize_is_the_insightface_formula_for_every_level():
    levels = np.arange(256, dtype=np.uint8)
    expected = ((levels.astype(np.float64) - 127.5) / 127.5).astype(np.float32)
    got = normalize(torch.from_numpy(levels))
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), expected)
    assert float(got[0]) == -1.0 and float(got[255]) == 1.0
    with pytest.raises(DcqError, match="uint8"):
        normalize(torch.zeros(3))


def test_to_chw_uint8_layout_and_flip():
    img = _ramp(5, 7)
    t = to_chw_uint8(img)
    assert t.dtype == torch.uint8 and t.shape == (3, 5, 7) and t.is_contiguous()
    for c in range(3):
        for y in range(5):
            for x in range(7):
                assert int(t[c, y, x]) == int(img[y, x, c])
                assert int(to_chw_uint8(img, flip=True)[c, y, x]) == int(img[y, 6 - x, c])
    batch = to_chw_uint8(np.stack([img, img[::-1]]))
    assert batch.shape == (2, 3, 5, 7) and torch.equal(batch[0], t)
    t[0, 0, 0] = 0 if img[0, 0, 0] else 1  # its own memory: the array is untouched
    assert int(img[0, 0, 0]) != int(t[0, 0, 0])
    with pytest.raises(DcqError, match="uint8"):
        to_chw_uint8(img.astype(np.float32))


def test_uint8_transforms_normalise_to_the_float_ones():
    img = _ramp(16, 16)
    data = _encode(img, "JPEG")
    ev = EvalTransform(8, normalize=False)(data)
    assert ev.dtype == torch.uint8 and ev.shape == (3, 8, 8)
    assert torch.equal(normalize(ev), EvalTransform(8)(data))
    as_uint8 = TrainTransform(16, seed=4, normalize=False)
    as_float = TrainTransform(16, seed=4)
    flips = 0
    for _ in range(40):
        u, f = as_uint8(data), as_float(data)
        assert u.dtype == torch.uint8 and torch.equal(normalize(u), f)  # the same flips, the same values
        flips += bool(torch.equal(u, to_chw_uint8(decode_image(data, 16), flip=True)))
    assert 5 < flips < 35


def test_bad_decoder_name_fails_when_the_transform_is_built():
    with pytest.raises(DcqError, match="unknown JPEG decoder"):
        TrainTransform(16, decoder="gpu")
    with pytest.raises(DcqError, match="unknown JPEG decoder"):
        EvalTransform(16, decoder="gpu")


def _tiny_step(seed: int):
    from dcq.heads.full_fc import FullFC
    from dcq.train.step import TrainStep

    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 6 * 6, 8))
    head = FullFC(8, 4)
    opt = torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=0.1)
    return TrainStep(net, head, opt), net


def test_train_step_normalises_uint8_batches_exactly_like_float_ones():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(5, 6, 6, 3), dtype=np.uint8)
    labels = torch.tensor([0, 1, 2, 3, 1])
    from dcq.data import chw_view

    step_u, net_u = _tiny_step(0)
    step_c, net_c = _tiny_step(0)  # uint8 in the decoder's pixel order, as the training loader gives it
    step_f, net_f = _tiny_step(0)
    for _ in range(3):
        out_u = step_u(to_chw_uint8(images), None, labels, device=torch.device("cpu"))
        out_c = step_c(chw_view(images), None, labels, device=torch.device("cpu"))
        out_f = step_f(to_tensor(images), None, labels, device=torch.device("cpu"))
        assert torch.equal(out_u.loss, out_f.loss) and torch.equal(out_c.loss, out_f.loss)
    for a, b, c in zip(net_u.parameters(), net_f.parameters(), net_c.parameters()):
        assert torch.equal(a, b) and torch.equal(c, b)


def test_embedding_moves_uint8_and_matches_float_input_exactly():
    from dcq.encoders import _batch_tensor, embed_images

    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(6, 6, 6, 3), dtype=np.uint8)
    assert _batch_tensor(images, 0, 4, 6).dtype == torch.uint8
    assert _batch_tensor([_encode(im) for im in images], 0, 4, 6).dtype == torch.uint8
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 6 * 6, 4))
    from_uint8 = embed_images(net, images, batch_size=4, image_size=6)
    from_float = embed_images(net, to_tensor(images), batch_size=4, image_size=6)
    np.testing.assert_array_equal(from_uint8, from_float)
