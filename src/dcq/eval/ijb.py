"""IJB-B / IJB-C 1:1 template verification on insightface's file layout.

The field compares face models on IJB-C's TAR at FAR 1e-4 / 1e-5, computed the way insightface's
``eval_ijbc.py`` computes it; this module reproduces that protocol on the same files::

    DIR/meta/<name>_face_tid_mid.txt        image template_id media_id       (one line per face crop)
    DIR/meta/<name>_name_5pts_score.txt     image x1 y1 ... x5 y5 faceness   (5 landmarks in the crop)
    DIR/meta/<name>_template_pair_label.txt t1 t2 label                      (1 = same person)
    DIR/loose_crop/<image>

- every crop is aligned to the ArcFace template (`dcq.align.align_face`, scaled to the model's input
  size) and embedded with the flip test: its feature is f(x) + f(mirror x), **not** normalised;
- **pooling** (insightface's test mode N1 D1 F1, the one its published IJB tables use): each crop's
  feature keeps its norm and is multiplied by its faceness score; crops of one media (frames of one
  video, or one still) are averaged; the media of a template are summed; only the template is
  L2-normalised, in float64. Equivalently a template is the normalised sum of
  ``faceness / (crops in its media)`` times each crop's feature, so crops are streamed in batches
  into per-template sums and never held all at once. ``unit_crops=True`` (``--ijb-unit-crops``)
  normalises each crop's feature first: insightface's N0 D1 F1; ``--no-flip`` gives F0;
- **score** of a template pair = dot product of the two template vectors (float64);
- **TAR at FAR** by two rules, both reported: ``tar_at_far`` is dcq's strict rule (the best TAR of
  any threshold whose false accept rate is <= the target, ``None`` below one impostor;
  `dcq.eval.verification.tar_at_far_from_scores`), and ``tar_at_far_insightface`` is insightface's
  (the ROC point of scikit-learn's ``roc_curve`` with default settings whose FPR is nearest the target,
  taking the largest TPR among points at that FPR), which always gives a number, also where too few
  impostors exist to measure that FAR.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import InitVar, dataclass, field
from pathlib import Path

import numpy as np

from dcq.errors import DcqError

__all__ = [
    "IJB_FAR_TARGETS",
    "IJB_NAMES",
    "IJBMeta",
    "TemplatePooler",
    "evaluate_ijb",
    "ijb_far_key",
    "ijb_test_mode",
    "pair_scores",
    "pooling_weights",
    "read_ijb_meta",
    "tar_at_far_insightface",
    "tar_at_far_strict",
]

IJB_NAMES = ("ijbc", "ijbb")
IJB_FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
_PAIR_BATCH = 16384  # template pairs scored at once: 2 x 16384 x d float64 gathered
_READ_BLOCK = 1 << 25  # bytes of the pair file parsed at once


def ijb_test_mode(unit_crops: bool = False, flip: bool = True) -> str:
    """insightface's name of the pooling used: N1D1F1 by default (N: crop features keep their norm,
    D: weighted by faceness, F: flip test)."""
    return f"N{0 if unit_crops else 1}D1F{1 if flip else 0}"


def ijb_far_key(far: float) -> str:
    """1e-4 -> "1e-04": the FAR keys of the IJB results (insightface's table labels)."""
    return f"{float(far):.0e}"


# --------------------------------------------------------------------------- meta files
@dataclass
class IJBMeta:
    """The protocol files of one IJB set, one entry per face crop and per template pair."""

    root: Path
    name: str
    images: list[str]  # crop file names under loose_crop/
    template_ids: np.ndarray  # (N,) int64
    media_ids: np.ndarray  # (N,) int64
    landmarks: np.ndarray  # (N, 5, 2) float64, pixels of the crop
    faceness: np.ndarray  # (N,) float64
    pair_templates: InitVar[np.ndarray]  # (P, 2) template ids; kept as `pair_index` only
    pair_labels: np.ndarray  # (P,) bool
    templates: np.ndarray = field(init=False)  # sorted distinct template ids
    template_index: np.ndarray = field(init=False)  # (N,) row of each crop's template in `templates`
    pair_index: np.ndarray = field(init=False)  # (P, 2) int32 rows in `templates` (IJB-C: 15.7M pairs)

    def __post_init__(self, pair_templates):
        self.templates, inv = np.unique(self.template_ids, return_inverse=True)
        self.template_index = inv.reshape(-1)
        flat = np.asarray(pair_templates).reshape(-1)
        pos = np.searchsorted(self.templates, flat).clip(0, max(0, len(self.templates) - 1))
        known = (len(self.templates) > 0) & (self.templates[pos] == flat) if len(flat) else np.ones(0, bool)
        if not np.all(known):
            bad = int(flat[np.flatnonzero(~known)[0]])
            raise DcqError(f"{self.pair_file}: template {bad} is in a pair but has no crop in {self.tid_file}; "
                           "the meta files are from different sets")
        self.pair_index = pos.reshape(-1, 2).astype(np.int32 if len(self.templates) < 2**31 else np.int64)

    @property
    def tid_file(self) -> Path:
        return self.root / "meta" / f"{self.name}_face_tid_mid.txt"

    @property
    def landmark_file(self) -> Path:
        return self.root / "meta" / f"{self.name}_name_5pts_score.txt"

    @property
    def pair_file(self) -> Path:
        return self.root / "meta" / f"{self.name}_template_pair_label.txt"


def _lines(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                fields = line.split()
                if fields and not fields[0].startswith("#"):
                    yield number, fields
    except UnicodeDecodeError as exc:
        raise DcqError(f"{path}: not a text file ({exc.reason})") from None


def _read_tid_mid(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    names, tids, mids = [], [], []
    for number, fields in _lines(path):
        if len(fields) != 3:
            raise DcqError(f"{path}:{number}: expected 'image template_id media_id', got {len(fields)} fields")
        try:
            tids.append(int(fields[1]))
            mids.append(int(fields[2]))
            if not (abs(tids[-1]) < 2**63 and abs(mids[-1]) < 2**63):
                raise ValueError
        except ValueError:
            raise DcqError(f"{path}:{number}: template and media ids must be integers below 2^63: "
                           f"{' '.join(fields)[:100]}") \
                from None
        names.append(fields[0])
    return names, np.asarray(tids, dtype=np.int64), np.asarray(mids, dtype=np.int64)


def _parse_int_lines(path: Path, text: bytes, first_line: int, ncols: int) -> np.ndarray:
    """(lines, ncols) int64 of a block of whole lines; the slow line-by-line parse names a bad line."""
    rows = text.count(b"\n") + (0 if text.endswith(b"\n") or not text else 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            values = np.fromstring(text, dtype=np.int64, sep=" ")  # text mode: whitespace-separated
        except (ValueError, DeprecationWarning):
            values = None
    limits = np.iinfo(np.int64)
    if values is not None and values.size == rows * ncols and not (
            (values == limits.max) | (values == limits.min)).any():  # numpy clips out-of-range ids silently
        return values.reshape(rows, ncols)
    out = []
    for k, line in enumerate(text.decode("utf-8", "replace").splitlines()):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != ncols:
                raise ValueError
            out.append([int(v) for v in fields])
            if max(abs(v) for v in out[-1]) >= 2**63:
                raise ValueError
        except ValueError:
            raise DcqError(f"{path}:{first_line + k}: expected {ncols} integers ('t1 t2 label'), got "
                           f"{line.strip()[:100]!r}") from None
    return np.asarray(out, dtype=np.int64).reshape(-1, ncols)


def _read_pairs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Template pairs and labels, parsed in blocks (IJB-C holds 15.7M lines)."""
    parts, line, rest = [], 1, b""
    with open(path, "rb") as f:
        while True:
            block = f.read(_READ_BLOCK)
            data = rest + block
            if not block:
                if data.strip():
                    parts.append(_parse_int_lines(path, data, line, 3))
                break
            cut = data.rfind(b"\n") + 1
            whole, rest = data[:cut], data[cut:]
            if whole:
                parts.append(_parse_int_lines(path, whole, line, 3))
                line += whole.count(b"\n")
    if not parts:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=bool)
    for block in parts:
        bad = (block[:, 2] != 0) & (block[:, 2] != 1)
        if bad.any():
            raise DcqError(f"{path}: pair labels must be 0 or 1, found {int(block[np.flatnonzero(bad)[0], 2])}")
    labels = np.concatenate([b[:, 2] == 1 for b in parts])
    pairs = np.empty((len(labels), 2), dtype=np.int64)
    row = 0
    while parts:  # move the blocks into one array, freeing each as it is copied
        block = parts.pop(0)
        pairs[row:row + len(block)] = block[:, :2]
        row += len(block)
    return pairs, labels


def read_ijb_meta(root, name: str = "ijbc") -> IJBMeta:
    """Parse the three meta files of ``root`` (see the module docstring); crops are matched to their
    landmarks by image name."""
    from dcq.align import read_landmarks

    root = Path(root)
    if name not in IJB_NAMES:
        raise DcqError(f"--ijb-name {name!r}: choose one of {', '.join(IJB_NAMES)}")
    meta_dir = root / "meta"
    files = [meta_dir / f"{name}_{s}.txt" for s in ("face_tid_mid", "name_5pts_score", "template_pair_label")]
    for f in files:
        if not f.is_file():
            others = sorted(p.name for p in meta_dir.glob("*_face_tid_mid.txt")) if meta_dir.is_dir() else []
            hint = f" (this folder has {', '.join(others)}: pass --ijb-name {others[0].split('_')[0]})" if others \
                else "; make a synthetic set with `dcq synth DIR --profile ijb`"
            raise DcqError(f"--ijb {root}: {f.relative_to(root)} not found; expected insightface's IJB layout "
                           f"DIR/meta/{name}_*.txt + DIR/loose_crop/{hint}")
    if not (root / "loose_crop").is_dir():
        raise DcqError(f"--ijb {root}: no loose_crop/ folder with the face crops")
    names, tids, mids = _read_tid_mid(files[0])
    if not names:
        raise DcqError(f"{files[0]}: holds no crops")
    marks = read_landmarks(files[1])
    points = np.empty((len(names), 5, 2), dtype=np.float64)
    faceness = np.empty(len(names), dtype=np.float64)
    for i, image in enumerate(names):
        entry = marks.get(image)
        if entry is None:
            raise DcqError(f"{files[1]}: no landmarks for {image} (listed in {files[0].name}); the meta files "
                           "are from different sets")
        if entry[1] is None:
            raise DcqError(f"{files[1]}: {image} has no faceness score (12th field); IJB pooling weights crops "
                           "by it")
        points[i], faceness[i] = entry
        if not faceness[i] > 0:  # a weight of 0 or less would drop or invert the crop in its template
            raise DcqError(f"{files[1]}: {image} has faceness {faceness[i]:g}; IJB pooling weights crops by this "
                           "detector score, which must be > 0: fix the landmark file")
    pairs, labels = _read_pairs(files[2])
    if len(labels) == 0:
        raise DcqError(f"{files[2]}: holds no template pairs")
    return IJBMeta(root, name, names, tids, mids, points, faceness, pairs, labels)


# --------------------------------------------------------------------------- pooling
def pooling_weights(template_index, media_ids, faceness) -> np.ndarray:
    """Weight of each crop in its template's sum: faceness / number of crops of its (template, media)."""
    t = np.asarray(template_index, dtype=np.int64).reshape(-1)
    m = np.asarray(media_ids, dtype=np.int64).reshape(-1)
    s = np.asarray(faceness, dtype=np.float64).reshape(-1)
    _, group, counts = np.unique(np.stack([t, m], axis=1), axis=0, return_inverse=True, return_counts=True)
    return s / counts[group.reshape(-1)]


class TemplatePooler:
    """Running per-template sums of weighted crop embeddings (float64), fed one batch at a time."""

    def __init__(self, n_templates: int, dim: int):
        self.sums = np.zeros((int(n_templates), int(dim)), dtype=np.float64)

    def add(self, template_index: np.ndarray, weights: np.ndarray, features: np.ndarray) -> None:
        if features.shape[1] != self.sums.shape[1]:
            raise DcqError(f"embeddings are {features.shape[1]}-d, the pooler was made for {self.sums.shape[1]}")
        np.add.at(self.sums, np.asarray(template_index), np.asarray(weights, np.float64)[:, None] * features)

    def templates(self) -> np.ndarray:
        """(T, d) float64 unit template vectors (a template whose weights are all 0 stays 0)."""
        norm = np.linalg.norm(self.sums, axis=1, keepdims=True)
        return self.sums / np.maximum(norm, 1e-12)


def pair_scores(template_feats: np.ndarray, index_a, index_b, batch: int = _PAIR_BATCH) -> np.ndarray:
    """Dot products of template rows index_a[k], index_b[k] in float64, ``batch`` pairs at a time."""
    a, b = np.asarray(index_a).reshape(-1), np.asarray(index_b).reshape(-1)
    out = np.empty(len(a), dtype=np.float64)
    for s in range(0, len(a), batch):
        fa, fb = template_feats[a[s:s + batch]], template_feats[b[s:s + batch]]
        out[s:s + batch] = np.einsum("ij,ij->i", fa.astype(np.float64), fb.astype(np.float64))
    return out


# --------------------------------------------------------------------------- TAR at FAR
def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).astype(bool).reshape(-1)
    if s.shape != y.shape:
        raise DcqError(f"{s.size} scores but {y.size} labels")
    if not np.all(np.isfinite(s)):
        raise DcqError("template scores hold NaN or inf; the embeddings are not finite")
    return s, y


def tar_at_far_strict(scores, labels, far_targets: Sequence[float] = IJB_FAR_TARGETS) -> dict[str, float | None]:
    """dcq's rule: best TAR with FAR <= target; ``None`` where the target is below one impostor."""
    from dcq.eval.verification import far_key, tar_at_far_from_scores

    s, y = _check(scores, labels)
    strict = tar_at_far_from_scores(s[y], s[~y], far_targets)
    return {ijb_far_key(f): strict[far_key(f)] for f in far_targets}


def roc_points(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of scikit-learn's ``roc_curve`` with its default settings (as insightface calls it)."""
    from sklearn.metrics import roc_curve

    s, y = _check(scores, labels)
    if y.all() or not y.any():
        raise DcqError("IJB pairs hold only genuine or only impostor pairs; TAR at FAR needs both")
    fpr, tpr, _ = roc_curve(y.astype(np.int8), s)
    return fpr, tpr


def tar_at_far_insightface(scores=None, labels=None, far_targets: Sequence[float] = IJB_FAR_TARGETS,
                           roc: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
    """insightface's rule: the TPR of the ROC point whose FPR is nearest each target.

    Points are scikit-learn's ``roc_curve`` (default ``drop_intermediate``), ordered by rising FPR;
    of the points at the smallest distance the last one wins, i.e. the largest TPR at the nearest
    FPR (and of two FPRs equally near, the higher). Pass ``roc`` to reuse computed points.
    """
    fpr, tpr = roc if roc is not None else roc_points(scores, labels)
    out = {}
    for f in far_targets:
        dist = np.abs(fpr - float(f))
        out[ijb_far_key(f)] = float(tpr[np.flatnonzero(dist == dist.min())[-1]])
    return out


# --------------------------------------------------------------------------- end to end
@dataclass
class IJBEvaluation:
    metrics: dict  # the `dcq eval --json` entry
    fpr: np.ndarray
    tpr: np.ndarray
    embed_seconds: float
    score_seconds: float


def _load_crop(path: Path) -> np.ndarray:
    from dcq.data.decode import decode_bytes

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DcqError(f"{path}: face crop not found (listed in the IJB meta files)") from None
    except OSError as exc:
        raise DcqError(f"{path}: cannot read the face crop ({exc.strerror or exc})") from None
    try:  # the loader's decoder: its pixel bound refuses a crop too large to decode (memory)
        return decode_bytes(data, None, where=str(path))
    except DcqError as exc:
        raise DcqError(f"{str(exc).split(';')[0]}; fix or replace the face crop") from None


def embed_templates(model, meta: IJBMeta, batch_size: int = 256, progress: bool = False,
                    unit_crops: bool = False) -> np.ndarray:
    """(T, d) float64 unit template vectors: crops aligned, embedded and pooled one batch at a time
    (crop features raw, N1, or unit vectors with ``unit_crops``, N0)."""
    from dcq.align import align_face

    size = int(model.image_size)
    weights = pooling_weights(meta.template_index, meta.media_ids, meta.faceness)
    pooler = None
    crops = meta.root / "loose_crop"
    n = len(meta.images)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"{meta.name} crops", unit="img", dynamic_ncols=True)
    try:
        for start in range(0, n, batch_size):
            rows = range(start, min(n, start + batch_size))
            faces = np.stack([align_face(_load_crop(crops / meta.images[i]), meta.landmarks[i], size) for i in rows])
            feats = model.embed(faces, normalise=unit_crops)
            if pooler is None:
                pooler = TemplatePooler(len(meta.templates), feats.shape[1])
            pooler.add(meta.template_index[start:rows.stop], weights[start:rows.stop], feats)
            if bar is not None:
                bar.update(len(rows))
    finally:
        if bar is not None:
            bar.close()
    return pooler.templates()


def evaluate_ijb(model, root, name: str = "ijbc", batch_size: int = 256, progress: bool | None = None,
                 far_targets: Sequence[float] = IJB_FAR_TARGETS, unit_crops: bool = False) -> IJBEvaluation:
    """The IJB 1:1 protocol of ``root`` for ``model`` (a `dcq.encoders.FaceEncoder`); ``unit_crops``
    pools unit crop vectors (insightface's N0) instead of raw ones (N1, its published tables)."""
    if batch_size < 1:
        raise DcqError(f"--batch-size must be >= 1, got {batch_size}")
    meta = read_ijb_meta(root, name)
    t0 = time.perf_counter()
    feats = embed_templates(model, meta, batch_size, sys.stderr.isatty() if progress is None else progress,
                            unit_crops=unit_crops)
    t1 = time.perf_counter()
    scores = pair_scores(feats, meta.pair_index[:, 0], meta.pair_index[:, 1])
    labels = meta.pair_labels
    counts = {"images": len(meta.images), "templates": len(meta.templates)}
    del meta, feats  # the pair table is not needed by the ROC's sort, the largest step
    fpr, tpr = roc_points(scores, labels)
    metrics = {
        "test_mode": ijb_test_mode(unit_crops, getattr(model, "flip", True)),
        **counts,
        "pairs": int(len(labels)),
        "genuine_pairs": int(labels.sum()),
        "impostor_pairs": int((~labels).sum()),
        "tar_at_far": tar_at_far_strict(scores, labels, far_targets),
        "tar_at_far_insightface": tar_at_far_insightface(far_targets=far_targets, roc=(fpr, tpr)),
    }
    return IJBEvaluation(metrics, fpr, tpr, t1 - t0, time.perf_counter() - t1)


def ijb_table(results: dict) -> str:
    """Markdown table: one row per IJB set and rule."""
    from dcq.tables import fmt_metric, markdown_table

    keys = [ijb_far_key(f) for f in IJB_FAR_TARGETS]
    rows = []
    for name, r in results.items():
        for rule, label in (("tar_at_far", "FAR <= target"), ("tar_at_far_insightface", "nearest FPR (insightface)")):
            cells = [fmt_metric(r[rule].get(k)) for k in keys]
            rows.append([name, label, str(r["templates"]), str(r["pairs"])] + cells)
    return markdown_table(["set", "rule", "templates", "pairs"] + [f"TAR@FAR={k}" for k in keys], rows)

