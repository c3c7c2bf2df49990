"""Face detection speed on one core: photos/s and faces/s at 640x480 and 1920x1080.

    nice python benchmarks/detect_speed.py [--repeats 5] [--min-face 20,40] [--torch] [--json OUT]

The photos are built from scikit-image's astronaut portrait (one frontal face), so the number of
faces is known: **640x480** = the portrait at 480x480 (a ~95 px face) beside 160 columns of the
coffee-cup photo (no face), 1 face; **1920x1080** = 3 rows of 5 portraits at 360x360 (~70 px
faces, mirrored every other one) and 120 columns of coffee cup, 15 faces. The detector is
`dcq.deploy.detect.FaceDetector` from decoded pixels (decoding is not timed), onnxruntime with
one intra-op thread; ``--torch`` adds the same pipeline with the torch networks
(``torch.set_num_threads(1)``) for comparison. Every configuration runs once per repeat in a
rotating order; the median is reported, with the faces found (which must equal the faces placed).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def _resized(image: np.ndarray, height: int, width: int | None = None) -> np.ndarray:
    size = (width or height, height)
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))


def scenes() -> dict[str, tuple[np.ndarray, int]]:
    """name -> (H x W x 3 photo, faces placed in it)."""
    from skimage import data

    face, filler = data.astronaut(), data.coffee()
    small = np.concatenate([_resized(face, 480), _resized(filler, 480, 720)[:, :160]], axis=1)
    tile = _resized(face, 360)
    rows = [np.concatenate([tile if (r + c) % 2 == 0 else tile[:, ::-1] for c in range(5)], axis=1)
            for r in range(3)]
    big = np.concatenate([np.concatenate(rows, axis=0), _resized(filler, 1080, 1620)[:, :120]], axis=1)
    assert small.shape == (480, 640, 3) and big.shape == (1080, 1920, 3)
    return {"640x480": (small, 1), "1920x1080": (big, 15)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-face", default="20,40", help="comma-separated smallest face sizes (px)")
    parser.add_argument("--torch", action="store_true", help="also time the torch networks")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    from dcq.deploy.detect import FaceDetector, OnnxNetworks

    backends = {"onnxruntime": OnnxNetworks(threads=1)}
    if args.torch:
        import torch

        from dcq.deploy.mtcnn_nets import TorchNetworks
        from dcq.deploy.mtcnn_weights import shipped_weights

        torch.set_num_threads(1)
        backends["torch"] = TorchNetworks(shipped_weights())
    photos = scenes()
    configs = [(backend, scene, float(m)) for backend in backends for scene in photos
               for m in args.min_face.split(",")]
    detectors = {c: FaceDetector(backends[c[0]], min_face=c[2]) for c in configs}
    times: dict[tuple, list[float]] = {c: [] for c in configs}
    found: dict[tuple, int] = {}
    for c in configs:  # warm-up: first runs allocate onnxruntime's buffers
        found[c] = len(detectors[c].detect(photos[c[1]][0]))
    for r in range(args.repeats):
        for c in configs[r % len(configs):] + configs[:r % len(configs)]:
            t = time.perf_counter()
            detectors[c].detect(photos[c[1]][0])
            times[c].append(time.perf_counter() - t)
    rows = []
    print(f"{'backend':12} {'photo':10} {'min face':>8} {'faces':>9} {'ms/photo':>9} {'photos/s':>9} {'faces/s':>8}")
    for c in configs:
        seconds = statistics.median(times[c])
        placed = photos[c[1]][1]
        rows.append({"backend": c[0], "photo": c[1], "min_face": c[2], "faces_placed": placed,
                     "faces_found": found[c], "ms_per_photo": 1000 * seconds, "photos_per_s": 1 / seconds,
                     "faces_per_s": found[c] / seconds})
        print(f"{c[0]:12} {c[1]:10} {c[2]:8g} {found[c]:>4}/{placed:<4} {1000 * seconds:9.1f} {1 / seconds:9.2f} "
              f"{found[c] / seconds:8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": platform.processor() or platform.machine(), "threads": 1,
                       "repeats": args.repeats, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
