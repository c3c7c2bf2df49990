"""Training configuration: one typed dataclass, loaded from YAML, overridden with `--set key=value`.

Unknown keys and values of the wrong type or out of range are rejected with one line that names the
key, the value, and what is allowed, so a typo can never silently train the wrong model.

Every number has a range (`LIMITS`): a value such as ``seed=1e100`` or ``lr=1e308`` stops here, not
in a traceback deep inside torch. Values are quoted shortened in messages (`shown`), and the YAML
reader refuses what could exhaust memory or hide a mistake: alias expansion beyond `MAX_YAML_NODES`
nodes, nesting deeper than `MAX_YAML_DEPTH`, and a key given twice.

Renamed keys keep working: ``momentum`` (the weight generator's EMA) is read as
``generator_momentum``, ``train`` as ``train_data``, and a fractional ``queue_size`` (< 1) as
``queue_fraction``; each such key prints one note on stderr.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dcq.errors import DcqError, shown
from dcq.train.strict_yaml import read_yaml


@dataclass
class TrainConfig:
    # model
    backbone: str = "cpunet"
    embedding_size: int = 128
    image_size: int = 40
    dropout: float = 0.0
    init_from: str = ""  # fine-tune: backbone.pth (arcface_torch) or dcq checkpoint; a resumed run ignores it
    # head: dcq | fc | pfc
    head: str = "dcq"
    queue_size: int = 0  # DCQ: queue entries, a count; 0 = use queue_fraction
    queue_fraction: float = 0.1  # DCQ: queue entries as a fraction of the identities (when queue_size is 0)
    scale: float = 50.0
    margin: float = 0.3
    margin_type: str = "cosface"
    sample_rate: float = 0.1  # Partial FC
    dedup: bool = False  # DCQ extension
    # DCQ recipe (docs/results.md, "Why DCQ trailed FC" and "The claims at the paper's queue ratio"):
    # a class weight averaged from k=2 reference images; an EMA horizon 1/(1-m) of ~100 steps, which
    # matched 0.9 in short runs and won on the long tail at the paper's queue ratio (the paper's 0.999
    # is for ~200K-step runs); and the batch's own generated weights as extra, freshest negatives.
    # configs/paper_ms1mv2.yaml keeps the paper's form (k=1, 0.999, queue only)
    num_references: int = 2  # DCQ: k reference images averaged into one class weight (FC/PFC read 1)
    generator_momentum: float = 0.99  # weight generator EMA
    # DCQ: the other items' class weights of this batch are negatives too; "auto": when the queue holds
    # at least IN_BATCH_MIN_BATCHES global batches (dcq.heads.registry.uses_in_batch_negatives)
    in_batch_negatives: bool | str = "auto"
    bn_splits: int = 1  # single-process shuffle-BN groups for the weight generator
    shuffle_bn: bool = True  # under torchrun: shuffle the reference batch across ranks before BatchNorm
    # optimisation
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    sgd_momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"  # step | cosine
    milestones: list[float] = field(default_factory=lambda: [8.0, 16.0, 18.0])  # epochs
    lr_decay: float = 0.1
    warmup_epochs: float = 0.0
    epochs: float = 20.0
    max_steps: int = 0  # > 0: stop after this many steps (overrides epochs)
    batch_size: int = 128
    grad_clip: float = 5.0  # max gradient norm; 0 disables
    amp: str = "none"  # none | bf16 | fp16 (fp16 on CUDA only)
    channels_last: bool = False  # CUDA: NHWC convolutions (the loader already delivers NHWC pixels)
    compile: bool = False  # torch.compile the feature extractor's forward
    # data
    train_data: str = ""  # .rec file, folder with train.rec, or image-folder root
    sampling: str = "image"  # image | identity
    preload: bool = False  # decode the whole training set into memory once (small sets)
    workers: int = 2
    flip: bool = True
    on_bad_record: str = "fail"  # fail | skip
    # evaluation
    eval_bins: list[str] = field(default_factory=list)
    eval_every: int = 0  # steps; 0 = at the end of every epoch
    eval_batch_size: int = 256
    # run
    output: str = "runs/dcq"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    deterministic: bool = False
    threads: int = 0  # torch intra-op threads; 0 = leave as is
    log_every: int = 20
    checkpoint_every: int = 500  # steps; 0 = only at epoch ends and the end
    keep_last: int = 3
    progress: bool = True
    dist_timeout: float = 600.0  # seconds a rank waits in a collective before it gives up (lost rank)

    def validate(self) -> TrainConfig:
        self._check_ranges()
        from dcq.heads.registry import HEADS

        choices = {
            "head": tuple(HEADS),
            "margin_type": ("cosface", "arcface", "none"),
            "optimizer": ("sgd", "adamw"),
            "schedule": ("step", "cosine"),
            "amp": ("none", "bf16", "fp16"),
            "sampling": ("image", "identity"),
            "on_bad_record": ("fail", "skip"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise DcqError(f"config: {key}={shown(getattr(self, key))} is not one of {', '.join(allowed)}")
        for key, value in self.to_dict().items():
            if isinstance(value, float) and not math.isfinite(value):
                raise DcqError(f"config: {key}={value} must be a finite number")
        positive = ["embedding_size", "image_size", "batch_size", "scale", "lr", "epochs", "num_references",
                    "bn_splits", "log_every", "eval_batch_size", "dist_timeout"]
        for key in positive:
            if not getattr(self, key) > 0:
                raise DcqError(f"config: {key}={shown(getattr(self, key))} must be > 0")
        nonneg = ["margin", "weight_decay", "warmup_epochs", "max_steps", "grad_clip", "workers", "eval_every",
                  "checkpoint_every", "threads", "dropout", "sgd_momentum", "queue_size", "queue_fraction"]
        for key in nonneg:
            if getattr(self, key) < 0:
                raise DcqError(f"config: {key}={shown(getattr(self, key))} must be >= 0")
        if not 0.0 <= self.generator_momentum <= 1.0:
            raise DcqError(f"config: generator_momentum={self.generator_momentum} must be in [0, 1] "
                           "(the paper uses 0.999)")
        if not 0.0 < self.sample_rate <= 1.0:
            raise DcqError(f"config: sample_rate={self.sample_rate} must be in (0, 1]")
        if (self.queue_size > 0) == (self.queue_fraction > 0):
            raise DcqError(f"config: set exactly one of queue_size (a count, now {self.queue_size}) and "
                           f"queue_fraction (a fraction of the identities, now {self.queue_fraction})")
        if self.queue_fraction > 1:
            raise DcqError(f"config: queue_fraction={self.queue_fraction} must be in (0, 1]; "
                           "for a count of entries use queue_size")
        if self.batch_size < 2:
            raise DcqError(f"config: batch_size={self.batch_size} is too small: BatchNorm needs at least 2 "
                           "images per batch; use batch_size >= 2 (the paper uses 128 or more)")
        _check_model(self.backbone, self.image_size)
        if self.init_from and Path(self.init_from).is_dir():
            raise DcqError(f"config: init_from={self.init_from} is a folder; give a backbone.pth (arcface_torch) "
                           "or a dcq checkpoint .pt file")
        _check_device(self.device)
        if self.keep_last < 1:
            raise DcqError(f"config: keep_last={self.keep_last} must be >= 1")
        return self

    def _check_ranges(self) -> None:
        """Every number within `LIMITS`, milestones finite, text keys free of NUL, an output named."""
        for key, (low, high) in LIMITS.items():
            value = getattr(self, key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                    and not low <= value <= high:
                raise DcqError(f"config: {key}={shown(value)} is out of range; give {_number(low)} to {_number(high)}")
        for m in self.milestones:
            if not (math.isfinite(m) and 0 <= m <= LIMITS["epochs"][1]):
                raise DcqError(f"config: milestones holds {shown(m)}; give epochs as finite numbers >= 0, "
                               "e.g. [8, 16, 18]")
        for key in ("output", "train_data", "init_from", "device", "backbone"):
            if "\0" in getattr(self, key):
                raise DcqError(f"config: {key}={shown(getattr(self, key))} holds a NUL character; give a plain path")
        if any("\0" in b for b in self.eval_bins):
            raise DcqError("config: eval_bins holds a path with a NUL character; give plain paths")
        if not self.output.strip():
            raise DcqError("config: output is empty; set it to the run's folder, e.g. output=runs/dcq")

    @property
    def references(self) -> int:
        """Reference images per item the sampler draws: DCQ's k; FC and Partial FC draw one (so the
        sample stream is the same as ever) and decode none."""
        from dcq.heads.registry import head_spec

        return self.num_references if head_spec(self.head).needs_references else 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The range of every number (inclusive). Wide enough for any real run, narrow enough that nothing
# downstream overflows (a seed times the stream stride in 64 bits, a timeout in a timedelta, ...).
LIMITS: dict[str, tuple[float, float]] = {
    "embedding_size": (1, 65536), "image_size": (1, 4096), "dropout": (0, 0.999), "queue_size": (0, 2**31),
    "queue_fraction": (0, 1), "scale": (1e-6, 1e4), "margin": (0, 10), "sample_rate": (0, 1),
    "num_references": (1, 64), "generator_momentum": (0, 1), "bn_splits": (1, 4096), "lr": (1e-12, 1e4),
    "sgd_momentum": (0, 1), "weight_decay": (0, 10), "lr_decay": (0, 1e3), "warmup_epochs": (0, 1e6),
    "epochs": (1e-9, 1e6), "max_steps": (0, 10**12), "batch_size": (1, 2**20), "grad_clip": (0, 1e12),
    "workers": (0, 64), "eval_every": (0, 10**12), "eval_batch_size": (1, 2**20), "seed": (0, 2**32 - 1),
    "threads": (0, 1024), "log_every": (1, 10**12), "checkpoint_every": (0, 10**12), "keep_last": (1, 10**6),
    "dist_timeout": (1e-3, 1e7),
}
def _number(v: float) -> str:
    return f"{int(v):,}" if float(v).is_integer() and abs(v) < 1e15 else f"{v:g}"


def _check_model(backbone: str, image_size: int) -> None:
    from dcq.models import BACKBONES, image_size_problem

    if backbone not in BACKBONES:
        close = difflib.get_close_matches(backbone, BACKBONES, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise DcqError(f"config: unknown backbone {backbone!r}; {hint}choose one of {', '.join(BACKBONES)}")
    problem = image_size_problem(backbone, image_size)
    if problem:
        raise DcqError(f"config: image_size={image_size}: {problem}")


def _check_device(device: str) -> None:
    if device == "auto":
        return
    import torch

    try:
        torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise DcqError(f"config: unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


AUTO_SWITCHES = ("in_batch_negatives",)  # true, false or "auto" (decided when the run is built)


def _coerce(key: str, value: Any, source: str) -> Any:
    """Convert a YAML/--set value to the field's type, or fail with one clear line."""
    if key in AUTO_SWITCHES:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            return _scalar(bool, value)
        except ValueError:
            raise DcqError(f"config ({source}): {key}={shown(value)} is not true, false or auto") from None
    hint = _HINTS[key]
    origin = typing.get_origin(hint)
    try:
        if origin is list:
            if isinstance(value, str):
                value = (read_yaml(value, source) if value.strip().startswith("[")
                         else [v for v in value.split(",") if v])
            if not isinstance(value, list):
                raise TypeError
            (item,) = typing.get_args(hint)
            return [_scalar(item, v) for v in value]
        if origin in (typing.Union, types.UnionType):
            raise TypeError
        return _scalar(hint, value)
    except (TypeError, ValueError, yaml.YAMLError):
        what = "list such as [1, 2] or 1,2" if origin is list else f"{getattr(hint, '__name__', hint)}"
        raise DcqError(f"config ({source}): {key}={shown(value)} is not a valid {what}") from None


def _scalar(kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ValueError
    if kind is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        if isinstance(value, str):
            number = float(value)  # accepts 1e5
            if not number.is_integer():
                raise ValueError
            return int(number)
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    if kind is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError
        return str(value)
    raise TypeError


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise DcqError(f"--set {shown(pair)}: expected key=value, e.g. --set lr=0.05")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


RENAMED = {"momentum": "generator_momentum", "train": "train_data"}  # old key -> key
QUEUE_KEYS = ("queue_size", "queue_fraction")  # one of the two is set


def _is_fraction(value: Any) -> bool:
    try:
        return 0 < float(value) < 1 and not isinstance(value, bool)
    except (TypeError, ValueError):
        return False


def canonical_keys(values: dict[str, Any], source: str, notes: list[str] | None = None) -> dict[str, Any]:
    """`values` with old key names replaced by the current ones (a note per replacement).

    Also completes the queue pair: a queue_size given alone (a count) sets queue_fraction to 0.
    """
    out: dict[str, Any] = {}
    for key, value in values.items():
        new = "queue_fraction" if key == "queue_size" and _is_fraction(value) else RENAMED.get(key)
        if new is not None:
            if new in values:
                raise DcqError(f"config ({source}): both {key!r} (the old name) and {new!r} are set; keep {new!r}")
            if notes is not None:
                notes.append(f"config ({source}): {key}={shown(value)} read as {new}={shown(value)} "
                             f"({key!r} is the old name)")
            key = new
        out[key] = value
    if "queue_size" in out and "queue_fraction" not in out and str(out["queue_size"]).strip() not in ("0", "0.0"):
        out["queue_fraction"] = 0.0
    return out


def _print_notes(notes: list[str]) -> None:
    for note in dict.fromkeys(notes):
        print(f"note: {note}", file=sys.stderr)


def build_config(values: dict[str, Any], source: str = "config") -> TrainConfig:
    notes: list[str] = []
    values = canonical_keys(values, source, notes)
    _print_notes(notes)
    kwargs = {}
    for key, value in values.items():
        if key not in FIELDS:
            close = difflib.get_close_matches(str(key), list(FIELDS), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise DcqError(f"config ({source}): unknown key {shown(key)}{hint} (see configs/*.yaml for valid keys)")
        kwargs[key] = _coerce(key, value, source)
    return TrainConfig(**kwargs).validate()


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file (or defaults when None) + `key=value` overrides -> validated TrainConfig."""
    values: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DcqError(f"config file {path} does not exist")
        try:
            loaded = read_yaml(path.read_bytes().decode("utf-8"), f"config file {path}") or {}
        except UnicodeDecodeError as exc:
            raise DcqError(f"config file {path} is not UTF-8 text (byte {exc.start}); give a YAML file") from None
        except yaml.YAMLError as exc:
            raise DcqError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0][:300]}") from None
        except OSError as exc:
            raise DcqError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
        if not isinstance(loaded, dict):
            raise DcqError(f"config file {path} must be a mapping of key: value")
        values.update(loaded)
        source = str(path)
    notes: list[str] = []
    values = canonical_keys(values, source, notes)
    _print_notes(notes)
    cfg_file = build_config(values, source)
    if overrides:
        return build_config(with_changes(values, parse_set(overrides)), f"{source} + --set")
    return cfg_file


def parse_set(pairs: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE pairs as config values under the current key names (a note per renamed key)."""
    notes: list[str] = []
    changed = canonical_keys(parse_overrides(pairs), "--set", notes)
    _print_notes(notes)
    return changed


def with_changes(values: dict[str, Any], changed: dict[str, Any]) -> dict[str, Any]:
    """`values` with `changed` on top; a queue setting in `changed` replaces the one in `values`."""
    if any(k in changed for k in QUEUE_KEYS):
        values = {k: v for k, v in values.items() if k not in QUEUE_KEYS}
    return {**values, **changed}
