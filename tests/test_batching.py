"""Pixel-ordered uint8 batches: the default contiguous path's shapes and values, nothing rearranged on the CPU."""

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from dcq.data import chw_view, normalize, to_chw_uint8, to_tensor
from dcq.data.batching import collate_pairs, is_pixel_ordered, stack_images
from dcq.errors import DcqError


def _images(n=4, h=5, w=7, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def test_chw_view_has_to_chw_uint8_values_over_the_decoders_pixels():
    img = _images(1)[0]
    for flip in (False, True):
        v = chw_view(img, flip=flip)
        assert v.shape == (3, 5, 7) and v.dtype == torch.uint8
        assert torch.equal(v, to_chw_uint8(img, flip=flip))
        assert v.stride() == (1, 7 * 3, 3) and is_pixel_ordered(v)
    assert chw_view(img).data_ptr() == img.ctypes.data  # no copy without a flip
    batch = chw_view(_images(3))
    assert batch.shape == (3, 3, 5, 7) and batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, to_chw_uint8(_images(3)))
    frozen = img.copy()
    frozen.flags.writeable = False
    assert torch.equal(chw_view(frozen), to_chw_uint8(img))  # copied rather than aliasing read-only memory
    with pytest.raises(DcqError, match="uint8"):
        chw_view(img.astype(np.float32))


def test_pixel_order_is_recognised_exactly():
    hwc = torch.zeros(2, 4, 5, 6, 3, dtype=torch.uint8)
    assert is_pixel_ordered(hwc.movedim(-1, -3))  # (2, 4, 3, 5, 6) over (2, 4, 5, 6, 3)
    assert is_pixel_ordered(hwc[0, 1].movedim(-1, -3))
    assert not is_pixel_ordered(torch.zeros(2, 3, 5, 6, dtype=torch.uint8))  # planes
    assert not is_pixel_ordered(hwc[:, :, :, :4].movedim(-1, -3))  # a crop: gaps between rows
    assert not is_pixel_ordered(hwc.transpose(0, 1).movedim(-1, -3))  # batch dims out of order
    assert not is_pixel_ordered(hwc.float().movedim(-1, -3))
    assert not is_pixel_ordered(torch.zeros(4, 5, 6, 4, dtype=torch.uint8).movedim(-1, -3))  # 4 channels


def test_collate_pairs_equals_the_default_collate_in_pixel_order():
    imgs = _images(6)
    items = [(chw_view(imgs[i], flip=i == 3), stack_images([chw_view(imgs[i + 1]), chw_view(imgs[i + 2])],
                                                          shared=False), i) for i in (0, 3)]
    x, r, y = collate_pairs(items)
    dx, dr, dy = default_collate(items)
    assert torch.equal(x, dx) and torch.equal(r, dr) and torch.equal(y, dy) and y.dtype == torch.int64
    assert x.shape == (2, 3, 5, 7) and r.shape == (2, 2, 3, 5, 7)
    assert is_pixel_ordered(x) and is_pixel_ordered(r) and not x.is_contiguous()
    expected = to_tensor(np.stack([imgs[0], imgs[3][:, ::-1]]))
    assert normalize(x).is_contiguous() and torch.equal(normalize(x), expected)
    assert normalize(r).is_contiguous() and torch.equal(normalize(r), to_tensor(imgs[[1, 2, 4, 5]]).view(2, 2, 3, 5, 7))
    floats = [(to_tensor(imgs[i]), to_tensor(imgs[i + 1:i + 2]), i) for i in range(2)]
    fx, fr, _ = collate_pairs(floats)  # anything else: the default collate
    dfx, dfr, _ = default_collate(floats)
    assert fx.is_contiguous() and torch.equal(fx, dfx) and torch.equal(fr, dfr)
    planes = [to_chw_uint8(imgs[i]) for i in range(3)]
    assert stack_images(planes).is_contiguous() and torch.equal(stack_images(planes), torch.stack(planes))
    mixed = [chw_view(imgs[0]), to_chw_uint8(imgs[1])]
    assert torch.equal(stack_images(mixed), torch.stack(mixed))
