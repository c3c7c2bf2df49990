"""What a training set is to the rest of dcq: N encoded face images, each with an identity label.

`FaceRecordIO` (insightface ``train.rec``) and `ImageFolderDataset` (``root/<identity>/<image>``)
implement it, so the sampler, the training loop and evaluation ask for the same attributes and
never probe which kind they were given.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from dcq.data.groups import LabelGroups


class FaceSource(ABC):
    """Random access to a labelled set of encoded face images.

    Attributes every implementation sets:

    - ``num_identities``: identities, labelled ``0 .. num_identities - 1``;
    - ``labels`` (N,): the label of every image (may be memory-mapped);
    - ``groups``: the images of every identity (`LabelGroups`, what the pair sampler draws from);
    - ``identity_names``: an identity's name (folder name) by label, or None where the format has none.
    """

    num_identities: int
    labels: np.ndarray
    groups: LabelGroups
    identity_names: list[str] | None = None

    @abstractmethod
    def __len__(self) -> int:
        """Number of images."""

    @abstractmethod
    def image_bytes(self, i: int) -> bytes:
        """The encoded image ``i`` (JPEG/PNG bytes)."""

    @abstractmethod
    def where(self, i: int) -> str:
        """Where image ``i`` lives, for error messages (file, record, offset)."""

    @abstractmethod
    def indices_of(self, identity: int) -> np.ndarray:
        """Image indices of one identity (ascending)."""

    @abstractmethod
    def _check_index(self, i: int) -> int:
        """``i`` as a non-negative index, or IndexError."""

    def label(self, i: int) -> int:
        return int(self.labels[self._check_index(i)])

    def image(self, i: int, image_size: int | None = None) -> np.ndarray:
        """Decoded uint8 HxWx3 RGB; a corrupt image raises DcqError naming where it lives."""
        from dcq.data.transforms import decode_image

        i = self._check_index(i)
        return decode_image(self.image_bytes(i), image_size, where=self.where(i))

    def __getitem__(self, i: int) -> tuple[bytes, int]:
        return self.image_bytes(i), self.label(i)
