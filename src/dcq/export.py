"""`dcq export CKPT --onnx OUT`: the evaluation encoder as ONNX, checked against onnxruntime.

The exported graph maps a float32 batch (N, 3, S, S) in [-1, 1] (RGB, insightface's normalisation)
to raw embeddings (N, d); the batch axis is dynamic. The graph is written to a temporary file beside
OUT; the same random batch goes through PyTorch and onnxruntime, and only when their L2-normalised
embeddings (what face matching compares) agree within --atol does the file replace OUT. Raw
embeddings are not compared with an absolute tolerance: a trained iresnet's outputs have norms in
the thousands, where float32 rounding alone exceeds any fixed absolute bound.

The file carries its preprocessing in ONNX ``metadata_props`` (``dcq.image_size``, ``dcq.mean``,
``dcq.std``, ``dcq.color_order``, ``dcq.embedding_size``, ``dcq.encoder``, ``dcq.flip_test``,
``dcq.version``; `dcq.deploy.metadata`), which `dcq embed --onnx` reads.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from dcq.atomic import atomic_path, ensure_writable
from dcq.errors import DcqError, one_line


def configure_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a .pt written by dcq train (final.pt, best.pt or step_*.pt)")
    parser.add_argument("--onnx", required=True, metavar="OUT", help="output .onnx file")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17; 9 or newer)")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="max |torch - onnxruntime| between L2-normalised embeddings (default 1e-4)")
    parser.add_argument("--encoder", choices=["weight_generator", "feature_extractor"], default="weight_generator",
                        help="which encoder to export (DCQ evaluates with the weight generator)")


MIN_OPSET = 9  # BatchNormalization/PReLU as the exporter writes them


def export_onnx(encoder, image_size: int, out: Path, opset: int = 17) -> Path:
    """Write the ONNX graph of `encoder` to `out` (no check; see `run_export` for the checked export)."""
    import torch

    if opset < MIN_OPSET:
        raise DcqError(f"--opset {opset}: dcq exports opset {MIN_OPSET} or newer (17 is the default)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                encoder.eval(), (torch.zeros(1, 3, image_size, image_size),), str(out),
                input_names=["images"], output_names=["embeddings"],
                dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
                opset_version=opset, dynamo=False,
            )
    except (RuntimeError, ValueError, TypeError) as exc:  # torch.onnx errors subclass these
        raise DcqError(f"ONNX export with --opset {opset} failed: {one_line(exc)[:200]}") from None
    return Path(out)


def write_metadata(onnx_path: Path, metadata: dict[str, str]) -> None:
    """Store ``metadata`` (string keys and values) in the model's ``metadata_props``, replacing keys it has."""
    import onnx

    model = onnx.load(str(onnx_path))
    kept = [p for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=str(value))
    onnx.save(model, str(onnx_path))


def check_against_onnxruntime(encoder, onnx_path: Path, image_size: int, batch: int = 2) -> float:
    """Max |difference| between the L2-normalised PyTorch and onnxruntime embeddings of a random batch."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    try:
        onnx.checker.check_model(str(onnx_path))
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnx / onnxruntime raise their own types for an invalid graph
        raise DcqError(f"the exported graph is not valid ONNX: {one_line(exc)[:200]}") from None
    x = torch.rand(batch, 3, image_size, image_size) * 2 - 1
    with torch.no_grad():
        expected = encoder.eval()(x).numpy().astype(np.float64)
    got = session.run(["embeddings"], {"images": x.numpy()})[0].astype(np.float64)

    def unit(e):
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)

    if got.shape != expected.shape:
        return float("inf")
    return float(np.max(np.abs(unit(got) - unit(expected))))


def run_export(args: argparse.Namespace) -> int:
    from dcq import __version__
    from dcq.deploy.metadata import export_metadata
    from dcq.eval.pipeline import load_encoder

    out = Path(args.onnx)
    encoder, info, _ = load_encoder(args.checkpoint, prefer=args.encoder)
    ensure_writable(out)
    with atomic_path(out) as tmp:  # OUT is replaced only when the check passes
        export_onnx(encoder, info["image_size"], tmp, args.opset)
        write_metadata(tmp, export_metadata(image_size=info["image_size"], embedding_size=info["embedding_size"],
                                            encoder=info["which"], backbone=str(info["backbone"]),
                                            version=__version__))
        diff = check_against_onnxruntime(encoder, tmp, info["image_size"])
        if not diff <= args.atol:
            kept = "the previous file is untouched" if out.exists() else "nothing was written"
            raise DcqError(f"ONNX output differs from PyTorch by {diff:.2e} between L2-normalised embeddings "
                           f"(> --atol {args.atol}); {kept}")
    print(f"exported {info['which'].replace('_', ' ')} ({info['backbone']}, {info['image_size']}px, "
          f"{info['embedding_size']}-d) to {out}; onnxruntime max |diff| of normalised embeddings = {diff:.2e}")
    return 0
