""".ci/install-slurm: under CI=true a failed install fails the run; locally it skips, saying so."""
import os
import pathlib
import subprocess

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / ".ci" / "install-slurm"


def _run(tmp_path, ci: bool, uid: str = "0"):
    """Run the script where SLURM is absent, ``id -u`` says ``uid`` and apt-get always fails."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("id", f"echo {uid}"), ("apt-get", "echo 'E: Unable to locate package' >&2; exit 100")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = str(bin_dir)
    if ci:
        env["CI"] = "true"
    return subprocess.run(["/bin/bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("uid", ["0", "1000"])  # apt fails as root; no root at all
def test_failed_install_fails_under_ci(tmp_path, uid):
    res = _run(tmp_path, ci=True, uid=uid)
    assert res.returncode != 0
    assert "CI=true, so this fails the run" in res.stderr


@pytest.mark.parametrize("uid", ["0", "1000"])
def test_failed_install_skips_locally_with_one_visible_line(tmp_path, uid):
    res = _run(tmp_path, ci=False, uid=uid)
    assert res.returncode == 0
    lines = [line for line in res.stderr.splitlines() if line.startswith("install-slurm:")]
    assert len(lines) == 1 and lines[0].endswith("the SLURM tests will skip"), res.stderr
