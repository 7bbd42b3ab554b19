"""The `fedward` command starts without the training stack: `fedward --help`, every subcommand's
options and their defaults are built without importing torch, Opacus or MONAI (seconds each), nor
matplotlib (half a second; only a report's plots need it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

HEAVY = ("torch", "opacus", "monai", "matplotlib")


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


@pytest.mark.parametrize("command", ["simulate", "study"])
def test_a_run_folder_the_command_cannot_use_is_refused_before_the_training_stack_loads(command, tmp_path):
    """An --out that is a file is answered in about a second (not after loading torch, MONAI and
    Flower first), with the reason and exit status 2."""
    taken = tmp_path / "taken"
    taken.write_text("a file, not a folder")

    status, loaded, said = _command_in_a_fresh_process(
        [command, "configs/study-demo.yaml", "--out", str(taken)]
    )

    assert (status, loaded) == (2, []), said
    assert "is a file, not a folder" in said
    assert taken.read_text() == "a file, not a folder"


def _command_in_a_fresh_process(args: list[str]) -> tuple[int, list[str], str]:
    """`fedward ARGS` in a new Python process: its exit status, which of the training stack's packages
    (and Flower) it had imported when it returned, and what it printed (on one line)."""
    probe = (
        "import sys\n"
        "from server.cli import main\n"
        f"status = main({args!r})\n"
        f"print(status, *sorted(m for m in {(*HEAVY, 'flwr')!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    *printed, last = done.stdout.strip().splitlines()
    status, *loaded = last.split()
    return int(status), loaded, " ".join(" ".join(printed).split())


SITE_CONFIG = "configs/sites/example-dicom-site.yaml"


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["site", "check", "{missing}.yaml"], "does not exist"),
        (["site", "serve", "{missing}.yaml"], "does not exist"),
        (
            ["site", "validate", "{missing}.yaml", "--package", "{missing}", "--out", "{out}"],
            "does not exist",
        ),
        (
            ["site", "validate", SITE_CONFIG, "--package", "{missing}", "--out", "{out}"],
            "not a fedward model package",
        ),
        (["site", "monitor", "{missing}.yaml", "--package", "{missing}", "--out", "{out}"], "does not exist"),
        (
            ["site", "monitor", SITE_CONFIG, "--package", "{missing}", "--out", "{out}"],
            "not a fedward model package",
        ),
        (["predict", "{missing}", "{missing}.dcm", "--out", "{out}"], "not a fedward model package"),
        (["serve", "{missing}", "--dicomweb", "http://127.0.0.1:9"], "not a fedward model package"),
        (
            ["validate", "{missing}", "--study", "configs/demo.yaml", "--out", "{out}"],
            "not a fedward model package",
        ),
    ],
    ids=[
        "site check",
        "site serve",
        "site validate: config",
        "site validate: package",
        "site monitor: config",
        "site monitor: package",
        "predict",
        "serve",
        "validate",
    ],
)
def test_a_missing_site_config_or_package_is_refused_before_the_training_stack_loads(args, said, tmp_path):
    """A site operator's (or a coordinator operator's) wrong path is answered in about a second, with exit status 2 and what is wrong."""
    args = [a.format(missing=tmp_path / "missing", out=tmp_path / "out") for a in args]

    status, loaded, printed = _command_in_a_fresh_process(args)

    assert (status, loaded) == (2, []), printed
    assert said in printed
    assert not (tmp_path / "out").exists()
