"""Batches of DCQ items in the pixel order the decoder wrote: what a DataLoader worker hands over.

A uint8 training image leaves the transform as a (3, H, W) view of its H x W x 3 pixels
(``transforms.chw_view``). torch's default collate would stack it into contiguous planes, which is the
3-byte-pixel rearrangement the worker skipped. ``collate_pairs`` copies each image as it is laid out
into one buffer (in shared memory inside a worker, as the default collate does) and returns it seen as
(B, 3, H, W) and (B, k, 3, H, W): the default collate's shapes and values, channels-last memory.
``normalize`` (on the device, in ``TrainStep``) makes the float batch contiguous. Pinning and
``.to(device)`` keep the strides, so the rearranging happens once, on the device.

Anything else (float images, contiguous uint8 images, other item layouts) goes through torch's
default collate unchanged.
"""

from __future__ import annotations

import torch
from torch.utils.data import default_collate, get_worker_info

__all__ = ["collate_pairs", "is_pixel_ordered", "stack_images"]


def is_pixel_ordered(t: torch.Tensor) -> bool:
    """uint8 (..., 3, H, W) whose memory is (..., H, W, 3) without gaps, as ``chw_view`` returns it."""
    if t.dtype != torch.uint8 or t.dim() < 3 or t.shape[-3] != 3:
        return False
    n = t.dim()
    expected, size = [0] * n, 1
    for d in (n - 3, n - 1, n - 2, *range(n - 4, -1, -1)):  # innermost first: channel, x, y, then batch dims
        expected[d], size = size, size * t.shape[d]
    return list(t.stride()) == expected


def stack_images(images, shared: bool | None = None) -> torch.Tensor:
    """Same-shape (..., 3, H, W) images -> (N, ..., 3, H, W), each image's memory order kept.

    Pixel-ordered uint8 images are copied byte for byte into an (N, ..., H, W, 3) buffer, in shared
    memory when ``shared`` (default: inside a DataLoader worker, so the batch crosses to the trainer
    without another copy); any other tensors are stacked as the default collate stacks them."""
    images = list(images)
    first = images[0]
    shape, strides = first.shape, first.stride()
    if not (is_pixel_ordered(first) and all(t.shape == shape and t.stride() == strides for t in images)):
        return torch.stack(images) if shared is False else default_collate(images)
    shape = (len(images), *shape[:-3], *shape[-2:], 3)
    if shared or (shared is None and get_worker_info() is not None):
        storage = first._typed_storage()._new_shared(len(images) * first.numel(), device=first.device)
        out = first.new(storage).view(shape)  # the shared-memory buffer, as default_collate makes it
    else:
        out = torch.empty(shape, dtype=first.dtype)
    batch = out.movedim(-1, -3)  # (N, ..., 3, H, W) over the pixel-ordered buffer
    for i, t in enumerate(images):
        batch[i].copy_(t)  # the same strides on both sides: a plain memory copy
    return batch


def collate_pairs(batch):
    """[(sample, references, label), ...] -> (B, 3, H, W), (B, k, 3, H, W), (B,) int64, pixel order kept;
    references None when the items carry none."""
    if not (batch and all(isinstance(item, (tuple, list)) and len(item) == 3 for item in batch)):
        return default_collate(batch)
    samples, references, labels = zip(*batch)
    if all(r is None for r in references):  # a head without keys: no reference images decoded
        references = None
    if not all(isinstance(t, torch.Tensor) for t in samples + (references or ())):
        return default_collate(batch)
    return (stack_images(samples), stack_images(references) if references else None,
            default_collate(list(labels)))
