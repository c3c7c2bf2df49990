"""The `dcq` command: one sub-command per job, each implemented in the module that owns it.

Every sub-command module exposes ``configure_<name>(parser)`` and ``run_<name>(args) -> int``.
Modules are imported only when their command runs, so `dcq --help` stays fast. User errors
(`DcqError`, file errors, running out of memory) become one line on stderr and exit code 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dcq.errors import DcqError, one_line

# name -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("dcq.demo", "synthesise a long-tailed face set, train DCQ on CPU, evaluate, write a report"),
    "synth": ("dcq.data.synth.cli", "write a synthetic long-tailed face dataset in insightface formats"),
    "train": ("dcq.train.cli", "train a model from a YAML config (works under torchrun unchanged)"),
    "eval": ("dcq.eval.cli", "verification, long tail, identification, IJB, MegaFace of a checkpoint or .onnx"),
    "embed": ("dcq.deploy.embed_cli", "embeddings of images with a checkpoint (or --onnx MODEL, without torch)"),
    "verify": ("dcq.eval.cli", "are two face images the same person?"),
    "export": ("dcq.export", "export a checkpoint's encoder to ONNX, checked against onnxruntime"),
    "detect": ("dcq.deploy.detect_cli", "faces and their 5 landmarks in photos (MTCNN, no torch): a landmark file"),
    "align": ("dcq.deploy.align_cli", "aligned face crops from photos (faces detected, or from a landmark file)"),
    "gallery": ("dcq.deploy.gallery_cli", "enrol embeddings in a gallery and search it (exact or faiss IVF/HNSW)"),
    "convert": ("dcq.convert", "insightface arcface_torch backbone.pth -> dcq checkpoint, and back"),
    "bench": ("dcq.bench.cli", "benchmarks: head step time and memory against the number of identities"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcq",
        description="Face-recognition training with a Dynamic Class Queue (DCQ), "
        "plus full-FC and Partial-FC baselines.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        # Argument definitions live with the command; import lazily only for the chosen one.
        if name in argv[:2]:
            configure = getattr(importlib.import_module(module_name), f"configure_{name}")
            configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 1
    try:
        module = importlib.import_module(args._module)
        result = getattr(module, f"run_{args.command}")(args)
        return int(result or 0)
    except DcqError as exc:
        print(f"dcq {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))  # e.g. 143 for a run stopped by SIGTERM (dcq demo)
    except FileNotFoundError as exc:
        print(f"dcq {args.command}: error: file not found: {exc.filename or exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # read-only folder, full disk, a path that is a file or a folder, ...
        where = f": {exc.filename}" if exc.filename else ""
        print(f"dcq {args.command}: error: {exc.strerror or one_line(exc)}{where}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"dcq {args.command}: error: out of memory; use a smaller model, batch or dataset", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dcq {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
