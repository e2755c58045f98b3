"""`python -m lc_onnx` and the `lc-onnx` command: the CLI, after checking that ONNX Runtime is installed (it comes
with an extra, `lc-onnx[cpu]` or `lc-onnx[gpu]`, so the error says which to install, in one line)."""

from __future__ import annotations

import sys

from lc_onnx.runtime import MISSING, installed


def main() -> None:
    if not installed():
        print(f"error: {MISSING}", file=sys.stderr)
        sys.exit(2)
    from lc_onnx.cli import main as cli

    cli(prog_name="lc-onnx")


if __name__ == "__main__":
    main()
