"""Issue #23's CUDA-path fixes that CPU tests can pin down: list-typed config overrides,
torchrun.sh's environment, the conversion device, the grad-finite skip in fp32, and
packed SFT blends through validate(), the dry run and the dataset."""
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CFG = os.path.join(REPO, "launch/configs/tiny_cpu_pretrain.yaml")


# -- row 8: list element types from the command line -------------------------------------------
def test_list_override_takes_a_scalar_and_checks_element_types():
    from megatron_ext.train.config import load_config

    assert load_config(TINY_CFG, ["fault.inject_nan_at=5"]).fault.inject_nan_at == [5]
    assert load_config(TINY_CFG, ["fault.inject_nan_at=[2, 3.0]"]).fault.inject_nan_at == [2, 3]
    with pytest.raises(ValueError, match=r"fault.inject_nan_at\[1\]: expected int, got 'x'"):
        load_config(TINY_CFG, ["fault.inject_nan_at=[2, x]"])
    res = subprocess.run([sys.executable, "-m", "megatron_ext.train", "--config", TINY_CFG, "--set",
                          "fault.inject_nan_at=5", "--dry-run", "--world-size", "4"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_torchrun_sh_exports_cuda_device_max_connections(tmp_path):
    (tmp_path / "envdump.py").write_text(
        "import os\nprint('CDMC=' + os.environ.get('CUDA_DEVICE_MAX_CONNECTIONS', 'unset'), flush=True)\n")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_DEVICE_MAX_CONNECTIONS"}
    env.update(CONFIG=TINY_CFG, NPROC="1", PYTHON=sys.executable, MODULE="envdump",
               PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    res = subprocess.run([os.path.join(REPO, "launch/torchrun.sh")], capture_output=True, text=True, env=env,
                         timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "CDMC=1" in res.stdout, res.stdout
