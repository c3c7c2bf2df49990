"""`dcq export CKPT --onnx OUT`: the evaluation encoder as ONNX, checked against onnxruntime.

The exported graph maps a float32 batch (N, 3, S, S) in [-1, 1] (RGB, insightface's normalisation)
to raw embeddings (N, d); the batch axis is dynamic. After writing, the same random batch goes
through PyTorch and onnxruntime and the export is refused if they differ by more than --atol.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from dcq.atomic import atomic_write
from dcq.errors import DcqError


def configure_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a .pt written by dcq train (final.pt, best.pt or step_*.pt)")
    parser.add_argument("--onnx", required=True, metavar="OUT", help="output .onnx file")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--atol", type=float, default=1e-4, help="max |torch - onnxruntime| allowed")
    parser.add_argument("--encoder", choices=["weight_generator", "feature_extractor"], default="weight_generator",
                        help="which encoder to export (DCQ evaluates with the weight generator)")


def export_onnx(encoder, image_size: int, out: Path, opset: int = 17) -> Path:
    import torch

    def write(f) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                encoder.eval(), (torch.zeros(1, 3, image_size, image_size),), f,
                input_names=["images"], output_names=["embeddings"],
                dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
                opset_version=opset, dynamo=False,
            )

    return atomic_write(out, write)


def check_against_onnxruntime(encoder, onnx_path: Path, image_size: int, batch: int = 4) -> float:
    """Max absolute difference between PyTorch and onnxruntime on a random batch."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    onnx.checker.check_model(str(onnx_path))
    x = torch.rand(batch, 3, image_size, image_size) * 2 - 1
    with torch.no_grad():
        expected = encoder.eval()(x).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(["embeddings"], {"images": x.numpy()})[0]
    return float(np.max(np.abs(got - expected)))


def run_export(args: argparse.Namespace) -> int:
    from dcq.eval.pipeline import load_encoder

    encoder, info, _ = load_encoder(args.checkpoint, prefer=args.encoder)
    out = export_onnx(encoder, info["image_size"], Path(args.onnx), args.opset)
    diff = check_against_onnxruntime(encoder, out, info["image_size"])
    if not diff <= args.atol:
        out.unlink(missing_ok=True)
        raise DcqError(f"ONNX output differs from PyTorch by {diff:.2e} (> --atol {args.atol}); export removed")
    print(f"exported {info['which'].replace('_', ' ')} ({info['backbone']}, {info['image_size']}px, "
          f"{info['embedding_size']}-d) to {out}; onnxruntime max |diff| = {diff:.2e}")
    return 0
