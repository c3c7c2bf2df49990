"""Writing a face dataset as insightface RecordIO (``train.rec`` + ``train.idx``): what the
synthetic dataset ships as, in either of the layouts `dcq.data.recordio.FaceRecordIO` reads."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from dcq.data.recordio_format import RecordIOWriter, pack_record
from dcq.errors import DcqError

_FLOAT32_EXACT = 1 << 24  # float32 labels hold integers exactly only up to here


def write_face_recordio(out_dir, items: Iterable[tuple[int, bytes]], name: str = "train", *,
                        header: bool = True, num_identities: int | None = None) -> dict:
    """Write ``OUT/<name>.rec`` + ``.idx`` from ``(label, image_bytes)`` items, atomically.

    ``header=True`` writes insightface's header layout (what MS1MV2 ships as): items must come sorted
    by label (streamed, not held in memory); identity ``c`` gets a record with its image range even
    when it has no images (``num_identities`` sets how many). ``header=False`` writes the plain
    layout in item order (keys 0..N-1). Both files are written to temporary names and renamed at the
    end, so an interrupted run leaves no .rec that looks complete.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rec_path, idx_path = out_dir / f"{name}.rec", out_dir / f"{name}.idx"
    tmp_rec = out_dir / f".{name}.rec.tmp{os.getpid()}"
    tmp_idx = out_dir / f".{name}.idx.tmp{os.getpid()}"
    counts: list[int] = []
    n = 0
    try:
        with RecordIOWriter(tmp_rec, tmp_idx) as w:
            prev = -1
            for label, img in items:
                label = int(label)
                if label < 0:
                    raise DcqError(f"write_face_recordio: item {n} has negative label {label}")
                if header:
                    if label < prev:
                        raise DcqError(
                            f"write_face_recordio: item {n} has label {label} after label {prev}; the header "
                            "layout needs items sorted by label (sort them, or pass header=False)"
                        )
                    if n + 1 >= _FLOAT32_EXACT:
                        raise DcqError(
                            "write_face_recordio: more than 2^24 images cannot be indexed exactly by float32 "
                            "header labels; write the plain layout (header=False)"
                        )
                    prev = label
                    w.write(n + 1, pack_record(float(label), img))
                else:
                    w.write(n, pack_record(float(label), img))
                while len(counts) <= label:
                    counts.append(0)
                counts[label] += 1
                n += 1
            if header:
                c_total = max(len(counts), int(num_identities or 0))
                counts += [0] * (c_total - len(counts))
                first = n + 1
                start = 1
                for c, k in enumerate(counts):
                    w.write(first + c, pack_record(0.0, b"", extra_labels=(start, start + k)))
                    start += k
                w.write(0, pack_record(0.0, b"", extra_labels=(first, first + len(counts))))
        os.replace(tmp_idx, idx_path)
        os.replace(tmp_rec, rec_path)
    finally:
        for p in (tmp_rec, tmp_idx):
            if p.exists():
                p.unlink()
    return {"rec": str(rec_path), "idx": str(idx_path), "images": n, "identities": len(counts),
            "images_per_identity": counts}
