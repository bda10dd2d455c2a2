"""``softprompt export MODEL OUT_DIR``: the command-line face of ``softprompt.export.export``.

Plug into an argparse main::

    sub = parser.add_subparsers(dest="command")
    export_cli.add_parser(sub)          # sets defaults(func=export_cli.run)
    args = parser.parse_args(); return args.func(args)
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``export`` sub-command to an ``argparse`` subparsers object and return it."""
    p = subparsers.add_parser(
        "export", help="export a causal LM to an ONNX bundle (soft prompts as graph input)",
        description="Export a causal LM (llama, gpt2, qwen2, gemma) to a bundle directory "
                    "that onnxruntime + numpy + tokenizers can serve without torch. The export "
                    "ends by checking ONNX Runtime against PyTorch and fails on any mismatch.")
    p.add_argument("model", metavar="MODEL",
                   help="'default' (SmolLM2-135M-Instruct), a Hugging Face model directory, "
                        "or a .gguf file")
    p.add_argument("out_dir", metavar="OUT_DIR", help="bundle directory to write (an existing "
                   "bundle there is replaced)")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                   help="graph precision: fp32 (default, CPU) or fp16 (for GPU providers)")
    p.add_argument("--opset", type=int, default=None, metavar="N",
                   help="ONNX opset version (default: the exporter's)")
    p.add_argument("--optimize", action="store_true",
                   help="store ONNX Runtime's offline-optimised graph")
    p.add_argument("--weights", choices=("float", "int4"), default="float",
                   help="int4: linear layers as 4-bit MatMulNBits blocks of 32 (fp32 graph), "
                        "exact for GGUF Q4_0/Q4_1 models such as the default one, else "
                        "round-to-nearest; bundle.json records the score drift")
    p.add_argument("--no-validate", dest="validate", action="store_false",
                   help="skip the ONNX Runtime vs PyTorch check at the end (not recommended)")
    p.add_argument("--quiet", dest="progress", action="store_false",
                   help="no progress messages")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the export described by parsed ``args``; returns a process exit code."""
    from softprompt.models import ModelError

    from .errors import ExportValidationError
    from .exporter import export

    try:
        out = export(args.model, args.out_dir, dtype=args.dtype, opset=args.opset,
                     optimize=args.optimize, validate=args.validate,
                     progress=args.progress, weights=args.weights)
    except (ModelError, ExportValidationError, FileExistsError, ValueError) as e:
        print(f"softprompt export: error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


def main(argv=None) -> int:
    """Stand-alone entry point: ``python -m softprompt.export.cli MODEL OUT_DIR``."""
    parser = argparse.ArgumentParser(prog="softprompt")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
