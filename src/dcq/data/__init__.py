"""Datasets in the formats face-recognition people already have, and the DCQ pair sampler.

- ``FaceRecordIO``: insightface ``train.rec`` + ``train.idx`` (MS1MV2/3, Glint360K, WebFace), no mxnet;
  ``RecordReader`` reads records of any ``.rec`` by byte offset.
- ``ImageFolderDataset``: ``root/<identity>/<image>.jpg``.
- ``read_bin`` / ``write_bin``: verification ``.bin`` pairs (lfw.bin, ...), restricted unpickler.
- ``PairSampler`` / ``PairDataset``: (sample, reference) images of one identity, as DCQ trains on.
- ``synthesize``: the embedded long-tailed synthetic face dataset, written in those formats.

Names are imported lazily so ``import dcq.data`` stays cheap and a worker process only loads what
it uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dcq.lazy import lazy_attributes

_EXPORTS = {
    "FaceRecordIO": "dcq.data.recordio",
    "FaceSource": "dcq.data.source",
    "RecordIOWriter": "dcq.data.recordio",
    "RecordReader": "dcq.data.recordio_format",
    "LabelGroups": "dcq.data.groups",
    "write_face_recordio": "dcq.data.recordio",
    "pack_record": "dcq.data.recordio",
    "unpack_record": "dcq.data.recordio",
    "ImageFolderDataset": "dcq.data.folder",
    "open_dataset": "dcq.data.folder",
    "read_bin": "dcq.data.verification_bin",
    "write_bin": "dcq.data.verification_bin",
    "PairSampler": "dcq.data.pairs",
    "PairDataset": "dcq.data.pairs",
    "synthesize": "dcq.data.synth.dataset",
    "read_probe_set": "dcq.data.probe",
    "ProbeSet": "dcq.data.probe",
    "chw_view": "dcq.data.transforms",
    "decode_image": "dcq.data.transforms",
    "to_tensor": "dcq.data.transforms",
    "to_chw_uint8": "dcq.data.transforms",
    "normalize": "dcq.data.transforms",
    "TrainTransform": "dcq.data.transforms",
    "EvalTransform": "dcq.data.transforms",
}

__all__ = [
    "EvalTransform",
    "FaceRecordIO",
    "FaceSource",
    "ImageFolderDataset",
    "LabelGroups",
    "PairDataset",
    "PairSampler",
    "ProbeSet",
    "RecordIOWriter",
    "RecordReader",
    "TrainTransform",
    "chw_view",
    "decode_image",
    "normalize",
    "open_dataset",
    "pack_record",
    "read_bin",
    "read_probe_set",
    "synthesize",
    "to_chw_uint8",
    "to_tensor",
    "unpack_record",
    "write_bin",
    "write_face_recordio",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from dcq.data.folder import ImageFolderDataset, open_dataset
    from dcq.data.groups import LabelGroups
    from dcq.data.pairs import PairDataset, PairSampler
    from dcq.data.probe import ProbeSet, read_probe_set
    from dcq.data.recordio import (
        FaceRecordIO,
        RecordIOWriter,
        pack_record,
        unpack_record,
        write_face_recordio,
    )
    from dcq.data.recordio_format import RecordReader
    from dcq.data.source import FaceSource
    from dcq.data.synth.dataset import synthesize
    from dcq.data.transforms import (
        EvalTransform,
        TrainTransform,
        chw_view,
        decode_image,
        normalize,
        to_chw_uint8,
        to_tensor,
    )
    from dcq.data.verification_bin import read_bin, write_bin


__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)
