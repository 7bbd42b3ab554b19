"""The `fedward` command starts without the training stack: `fedward --help`, every subcommand's
options and their defaults are built without importing torch, Opacus or MONAI (seconds each)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

HEAVY = ("torch", "opacus", "monai")


def test_the_commands_parser_imports_no_training_stack():
    probe = (
        "import sys\n"
        "from server.cli import build_parser\n"
        "parser = build_parser()\n"
        "parser.parse_args(['audit', '--mode', 'secret'])\n"  # a subcommand's defaults, built for real
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )

    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
