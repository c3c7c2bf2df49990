"""insightface arcface_torch models in and out of dcq: the key mapping, `dcq convert` and `init_from`.

arcface_torch saves a trained model as `backbone.pth`: the plain state_dict of
`get_model(name, num_features=N)` (112 px). Its resume files (`checkpoint_gpu_N.pt`) hold the same
under `state_dict_backbone`; a `module.` prefix (a state_dict taken from the DDP wrapper) is
dropped. Both are read with `weights_only=True`: no code in the file runs.

The mapping is a renaming of keys, tensors are copied as they are. dcq's mbf and vit_* are built
with arcface_torch's module names, so their keys are the same on both sides. dcq's iresnet keeps
its embedding layers under `head.` (`head.bn2`, `head.fc`, `head.features`) where arcface_torch
has them at the top level (`bn2`, `fc`, `features`); the residual stages
(`layerN.M.{bn1,conv1,bn2,prelu,conv2,bn3,downsample.0,downsample.1}`), stem and BatchNorm
statistics have the same names and shapes on both sides.

A file is accepted only when it holds exactly the keys of the architecture, each with its shape;
otherwise the first key that does not fit is named, with the architectures the file does fit.

    dcq convert backbone.pth model.pt --arch r50   # arcface_torch -> dcq checkpoint (eval, embed, verify, export)
    dcq convert final.pt backbone.pth              # dcq checkpoint -> arcface_torch backbone.pth
"""

from __future__ import annotations

import argparse
import math
import pickle
from pathlib import Path
from typing import Any

import torch

from dcq.errors import DcqError

ARCHS = ("r18", "r34", "r50", "r100", "r200", "mbf", "vit_t", "vit_s", "vit_b")  # arcface_torch get_model names
ARCFACE_IMAGE_SIZE = 112  # arcface_torch builds every one of them for 112 px
IRESNET_HEAD = ("bn2.", "fc.", "features.")  # arcface_torch top-level keys that dcq's iresnet holds under head.


def arcface_arch(backbone: str) -> str | None:
    """arcface_torch's name for a dcq backbone (iresnet50 -> r50), None when there is none (cpunet, mlp)."""
    from dcq.models import canonical_name

    return next((a for a in ARCHS if canonical_name(a) == canonical_name(backbone)), None)


def _is_iresnet(backbone: str) -> bool:
    from dcq.models import canonical_name
    from dcq.models.iresnet import LAYERS

    return canonical_name(backbone) in LAYERS


def to_dcq(state: dict[str, torch.Tensor], backbone: str) -> dict[str, torch.Tensor]:
    """arcface_torch state_dict keys -> dcq's, for `backbone`."""
    if not _is_iresnet(backbone):
        return dict(state)
    return {(f"head.{k}" if k.startswith(IRESNET_HEAD) else k): v for k, v in state.items()}


def to_arcface(state: dict[str, torch.Tensor], backbone: str) -> dict[str, torch.Tensor]:
    """dcq state_dict keys -> arcface_torch's, for `backbone`."""
    if not _is_iresnet(backbone):
        return dict(state)
    return {k.removeprefix("head."): v for k, v in state.items()}


def arcface_shape(state: dict[str, torch.Tensor], arch: str) -> tuple[int, int]:
    """(embedding size, image size) of an arcface_torch state_dict of `arch`, read off its tensors.

    iresnet: fc takes 512 x s x s inputs for 16 s px; mbf: the GDC kernel is image / 16; vit: the
    position embedding has one row per 9 px patch (112 px for arcface_torch's 12 x 12)."""
    from dcq.models import canonical_name
    from dcq.models.iresnet import LAYERS
    from dcq.models.vit import PATCH

    name = canonical_name(arch)
    if name in LAYERS:
        embedding_key, size_key = "features.weight", "fc.weight"
    elif name == "mbf":
        embedding_key, size_key = "features.layers.3.weight", "features.layers.0.layers.0.weight"
    else:
        embedding_key, size_key = "feature.3.weight", "pos_embed"
    for key in (embedding_key, size_key):
        if key not in state:
            raise DcqError(f"key {key!r} is missing")
    embedding, sizer = state[embedding_key].shape[0], state[size_key].shape
    try:
        if name in LAYERS:
            side = math.isqrt(sizer[1] // 512)
            return embedding, 16 * side
        if name == "mbf":
            return embedding, 16 * sizer[-1]
        grid = math.isqrt(sizer[1])
        return embedding, ARCFACE_IMAGE_SIZE if grid == ARCFACE_IMAGE_SIZE // PATCH else grid * PATCH
    except (IndexError, ValueError):
        raise DcqError(f"key {size_key!r} has shape {tuple(sizer)}, which no {arch} has") from None


def _expected(backbone: str, embedding_size: int, image_size: int) -> dict[str, torch.Size]:
    """arcface_torch key -> shape for the model, from a copy built on the meta device (no memory)."""
    from dcq.models import get_backbone

    with torch.device("meta"):
        model = get_backbone(backbone, embedding_size=embedding_size, image_size=image_size)
    return {k: v.shape for k, v in to_arcface(model.state_dict(), backbone).items()}


def mismatch(state: dict[str, torch.Tensor], arch: str) -> str | None:
    """Why an arcface_torch state_dict is not one of `arch` (the first key that does not fit), or None."""
    try:
        embedding, size = arcface_shape(state, arch)
        expected = _expected(arch, embedding, size)
    except (DcqError, ValueError) as exc:
        return str(exc)
    missing = [k for k in expected if k not in state]
    if missing:
        more = f" ({len(missing)} keys missing in all)" if len(missing) > 1 else ""
        return f"key {missing[0]!r} is missing{more}"
    extra = [k for k in state if k not in expected]
    if extra:
        more = f" ({len(extra)} such keys in all)" if len(extra) > 1 else ""
        return f"key {extra[0]!r} is not part of {arch}{more}"
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            return f"key {k!r} has shape {tuple(state[k].shape)} where {arch} has {tuple(shape)}"
    return None


def fitting_archs(state: dict[str, torch.Tensor]) -> list[str]:
    """The arcface_torch architectures that `state` is a complete state_dict of."""
    return [arch for arch in ARCHS if mismatch(state, arch) is None]


def _not_fitting(where: str, arch: str, why: str, state: dict[str, torch.Tensor],
                 fix: str = "pass --arch {}") -> DcqError:
    fits = [a for a in fitting_archs(state) if a != arch]
    hint = (f"it fits {' / '.join(fits)}: {fix.format(fits[0])}" if fits
            else "it is none of " + ", ".join(ARCHS) + " (an arcface_torch backbone.pth of another model?)")
    return DcqError(f"{where} is not an arcface_torch {arch} state_dict: {why}; {hint}")


# -- reading ------------------------------------------------------------------------------------------
def read_source(path: str | Path, where: str | None = None) -> tuple[str, dict[str, Any]]:
    """("dcq", checkpoint) or ("arcface", state_dict) read from `path`, or a one-line DcqError."""
    from dcq.checkpoint import FORMAT, load_checkpoint

    path = Path(path)
    where = where or str(path)
    if not path.is_file():
        raise DcqError(f"{where} does not exist; give an arcface_torch backbone.pth or a dcq checkpoint .pt")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if "weights only" in first.lower() or "weights_only" in first:
            first = "it holds objects other than tensors and plain containers, so it was not loaded"
        raise DcqError(f"{where} cannot be read as a PyTorch state_dict ({first[:200]})") from None
    if isinstance(data, dict) and data.get("format") == FORMAT:
        return "dcq", load_checkpoint(path)  # again, through the checked loader (version, checksum)
    if isinstance(data, dict) and isinstance(data.get("state_dict_backbone"), dict):
        data = data["state_dict_backbone"]  # arcface_torch's checkpoint_gpu_N.pt
    if not isinstance(data, dict) or not data or not all(torch.is_tensor(v) for v in data.values()) \
            or not all(isinstance(k, str) for k in data):
        raise DcqError(f"{where} is neither a dcq checkpoint nor a state_dict of named tensors (as arcface_torch's "
                       "train_v2.py saves backbone.pth)")
    if all(k.startswith("module.") for k in data):
        data = {k.removeprefix("module."): v for k, v in data.items()}
    check_finite(data, where)
    return "arcface", data


def check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse weights holding NaN or inf: a model converted from them embeds every face as NaN."""
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise DcqError(f"{where}: weight {key[:100]!r} holds NaN or inf values; the model diverged or the file "
                           "is damaged: convert a checkpoint from before that")


# -- the two directions ------------------------------------------------------------------------------
def arcface_to_checkpoint(state: dict[str, torch.Tensor], arch: str, where: str) -> dict[str, Any]:
    """The payload of a dcq checkpoint (an export, as `final.pt`) holding an arcface_torch model."""
    from dcq.models import get_backbone

    why = mismatch(state, arch)
    if why:
        raise _not_fitting(where, arch, why, state)
    embedding, size = arcface_shape(state, arch)
    model = get_backbone(arch, embedding_size=embedding, image_size=size)
    model.load_state_dict(to_dcq(state, arch), strict=True)
    return {
        "model": {"backbone": arch, "embedding_size": embedding, "image_size": size},
        "feature_extractor": model.state_dict(), "weight_generator": None,
        "threshold": None, "identity_names": None, "config": {},
        "source": {"format": "arcface_torch", "arch": arch, "file": str(where)},
    }


def checkpoint_to_arcface(ckpt: dict[str, Any], prefer: str, where: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(arcface_torch state_dict, info) of a dcq checkpoint's encoder (`prefer`, as `dcq eval` picks it)."""
    from dcq.checkpoint import build_eval_encoder

    encoder, info = build_eval_encoder(ckpt, prefer=prefer)
    arch = arcface_arch(info["backbone"])
    if arch is None:
        raise DcqError(f"{where} holds a {info['backbone']}, which arcface_torch has no model for; "
                       f"convert an iresnet / r*, mbf or vit_* checkpoint ({', '.join(ARCHS)})")
    if info["image_size"] != ARCFACE_IMAGE_SIZE:
        raise DcqError(f"{where} holds a {info['image_size']} px {info['backbone']}; arcface_torch's {arch} "
                       f"takes {ARCFACE_IMAGE_SIZE} px only, so its layers would not fit: train at "
                       f"image_size={ARCFACE_IMAGE_SIZE}")
    state = to_arcface(encoder.state_dict(), arch)
    check_finite(state, where)
    return state, {**info, "arch": arch}


def initial_state(path: str | Path, backbone: str, embedding_size: int, image_size: int) -> tuple[dict, str]:
    """(dcq state_dict for `backbone`, what it is) read from `path` for `init_from`: an arcface_torch
    backbone.pth of this architecture, or a dcq checkpoint of this model (its evaluation encoder)."""
    from dcq.checkpoint import build_eval_encoder
    from dcq.models import canonical_name

    where = f"init_from {path}"
    kind, data = read_source(path, where)
    wanted = f"config has backbone={backbone}, embedding_size={embedding_size}, image_size={image_size}"
    if kind == "dcq":
        model = data.get("model") or {}
        have = (model.get("backbone"), model.get("embedding_size"), model.get("image_size"))
        if (canonical_name(str(have[0])), have[1], have[2]) != (canonical_name(backbone), embedding_size,
                                                                  image_size):
            raise DcqError(f"{where} holds a {have[0]} with {have[1]}-d embeddings at {have[2]} px; {wanted}: "
                           "set them to the checkpoint's")
        encoder, info = build_eval_encoder(data)
        return encoder.state_dict(), f"the {info['which'].replace('_', ' ')} of dcq checkpoint {path}"
    arch = arcface_arch(backbone)
    if arch is None:
        raise DcqError(f"{where} is an arcface_torch state_dict, and backbone={backbone} has no arcface_torch "
                       f"counterpart; set backbone to its architecture ({', '.join(ARCHS)})")
    why = mismatch(data, arch)
    if why:
        raise _not_fitting(where, arch, why, data, fix="set backbone={}")
    have_embedding, have_size = arcface_shape(data, arch)
    if (have_embedding, have_size) != (embedding_size, image_size):
        raise DcqError(f"{where} is a {arch} with {have_embedding}-d embeddings at {have_size} px; {wanted}: "
                       f"set embedding_size={have_embedding} and image_size={have_size}")
    return to_dcq(data, arch), f"arcface_torch {arch} {path}"


def init_backbone(model: torch.nn.Module, cfg) -> str:
    """Load `cfg.init_from` into a freshly built backbone (before the weight generator copies it);
    returns the line for the training log."""
    state, what = initial_state(cfg.init_from, cfg.backbone, cfg.embedding_size, cfg.image_size)
    model.load_state_dict(state, strict=True)
    return f"init_from: feature extractor and weight generator start from {what}; the head starts fresh"


# -- dcq convert ---------------------------------------------------------------------------------------
def configure_convert(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SRC", help="an arcface_torch backbone.pth (with --arch) or a dcq checkpoint")
    parser.add_argument("out", metavar="OUT", help="the file to write: a dcq checkpoint from a backbone.pth, "
                        "a backbone.pth from a dcq checkpoint")
    parser.add_argument("--arch", choices=ARCHS, help="the backbone.pth's architecture, as arcface_torch's "
                        "get_model names it")
    parser.add_argument("--encoder", choices=["weight_generator", "feature_extractor"], default="weight_generator",
                        help="from a dcq checkpoint: the encoder to write (default: the weight generator when "
                        "there is one, as dcq eval evaluates)")


def run_convert(args: argparse.Namespace) -> int:
    from dcq.atomic import atomic_write, ensure_writable
    from dcq.checkpoint import save_checkpoint
    from dcq.models import canonical_name

    source, out = Path(args.source), Path(args.out)
    if out.exists() and out.resolve() == source.resolve():
        raise DcqError(f"OUT {out} is SRC; write the converted model to another file")
    kind, data = read_source(source)
    if kind == "arcface":
        if args.arch is None:
            fits = fitting_archs(data)
            hint = f"it fits {', '.join(fits)}" if fits else f"one of {', '.join(ARCHS)}"
            raise DcqError(f"{source} is an arcface_torch state_dict: name its architecture with --arch ({hint})")
        ensure_writable(out)
        payload = arcface_to_checkpoint(data, args.arch, str(source))
        save_checkpoint(out, payload)
        m = payload["model"]
        print(f"wrote {out}: dcq checkpoint of arcface_torch {args.arch} ({m['embedding_size']}-d, "
              f"{m['image_size']} px); dcq eval, embed, verify and export read it, train reads it as init_from")
        return 0
    backbone = (data.get("model") or {}).get("backbone")
    if args.arch is not None and canonical_name(args.arch) != canonical_name(str(backbone)):
        raise DcqError(f"--arch {args.arch}: {source} is a dcq checkpoint of a {backbone}; drop --arch "
                       "(a dcq checkpoint names its own model)")
    state, info = checkpoint_to_arcface(data, args.encoder, str(source))
    ensure_writable(out)
    atomic_write(out, lambda f: torch.save(state, f))
    print(f"wrote {out}: the {info['which'].replace('_', ' ')} as an arcface_torch state_dict; load it with "
          f"get_model({info['arch']!r}, num_features={info['embedding_size']}).load_state_dict("
          f"torch.load({str(out)!r}), strict=True) ({info['image_size']} px)")
    return 0
