"""Command line: `fastformer pretrain | finetune | info` (DESIGN.md §4)."""
from __future__ import annotations

import argparse
import platform
import sys


def _info(args: argparse.Namespace) -> int:
    import torch

    import fastformer
    from fastformer.backend import get_backend, interpreting, triton_available

    lines = [
        f"fastformer {fastformer.__version__}",
        f"python     {platform.python_version()}",
        f"torch      {torch.__version__} (CUDA {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'})",
    ]
    if triton_available():
        import triton

        lines.append(f"triton     {triton.__version__}{' (interpreter)' if interpreting() else ''}")
    else:
        lines.append("triton     not available (reference backend only)")
    lines.append(f"backend    {get_backend()}")
    try:
        from fastformer.optim import extension_available

        lines.append(f"fused adam {'compiled extension' if extension_available() else 'torch fallback'}")
    except ImportError:
        pass
    print("\n".join(lines))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastformer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, devices and which kernels are in use")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
