"""bench.gpu_check (``make gpu-check``): its CPU mode end to end as CI runs it, the
self-test that makes every row FAIL, and its helpers (wheels, verdicts, sections)."""
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from bench.gpu_check import kernels, rows, wheels
from bench.gpu_check.__main__ import parse_sections
from bench.gpu_check.training import peak_tflops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_ROWS = {  # (section, check) that must PASS without CUDA
    ("1 block kernels", f"cpu_flash fp32 {c[0]}") for c in kernels.CASES} | {
    ("2 packed attention", "ring fp32 cpu docs=[200, 37, 130, 9]"),
    ("3 trainer resume", "20 iterations (gloo fp32 dist-opt)"),
    ("3 trainer resume", "resume at 10: iteration 11 loss"),
    ("3 trainer resume", "resume at 10: iterations 11-20"),
    ("4 forward_logits", "default device vs CPU-only process")}
CUDA_ROWS = {("1 block kernels", f"{k} {c[0]}") for k in ("cuda_flash bf16", "cuda_efficient fp32")
             for c in kernels.CASES} | {
    ("2 packed attention", "ring bf16 cuda docs=[200, 37, 130, 9]"),
    ("2 packed attention", "ring fp32 cuda docs=[200, 37, 130, 9]"),
    ("4 forward_logits", "device='cuda' vs CPU-only process"),
    ("5 kernel speed", "fwd: ours / SDPA flash"), ("5 kernel speed", "fwd+bwd: ours / SDPA flash"),
    ("5 kernel speed", "fwd+bwd: ours / SDPA default"),
    ("6 trainer MFU", "~1.03B model, 16K tokens, bf16, no recompute")}


def _run(tmp_path, *extra):
    res = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--cpu-only", "--work-dir", str(tmp_path / "work"),
                          "--results-dir", str(tmp_path), *extra], capture_output=True, text=True, timeout=280,
                         cwd=REPO)
    with open(tmp_path / "gpu_check.json") as f:
        return res, json.load(f)


def test_cpu_mode_passes_cpu_rows_and_skips_cuda_rows_saying_why(tmp_path):
    res, out = _run(tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = {(r["section"], r["check"]): r for r in out["rows"]}
    assert set(got) == CPU_ROWS | CUDA_ROWS, sorted(set(got) ^ (CPU_ROWS | CUDA_ROWS))
    for key in CPU_ROWS:
        assert got[key]["status"] == "PASS" and got[key]["figure"] is not None, got[key]
    for key in CUDA_ROWS:
        assert got[key]["status"] == "SKIP" and "CUDA" in got[key]["result"], got[key]
    table = res.stdout[res.stdout.index("GPU acceptance check"):]
    assert table.splitlines()[1].split() == ["section", "check", "result", "figure", "tolerance", "status"]
    assert len([line for line in table.splitlines() if line.rstrip().endswith(("PASS", "SKIP"))]) == len(got)
    assert "no CUDA device" in res.stdout and out["exit_code"] == 0 and out["partial"] is False


def test_perturbed_references_fail_every_row_that_runs(tmp_path):
    res, out = _run(tmp_path, "--perturb-reference")
    assert res.returncode == 1 and out["self_test"]
    got = {(r["section"], r["check"]): r["status"] for r in out["rows"]}
    assert {k for k, s in got.items() if s == "FAIL"} == CPU_ROWS, got
    assert {k for k, s in got.items() if s == "SKIP"} == CUDA_ROWS


# -- helpers ------------------------------------------------------------------------------------------
def test_rows_are_recorded_after_each_section_and_late_runs_are_not_started(monkeypatch):
    import time

    from bench.gpu_check.__main__ import Context, run_sections

    monkeypatch.setattr(kernels, "exact_rows", lambda cuda: [rows.Row("1 block kernels", "a", rows.PASS, "ok")])
    monkeypatch.setattr(kernels, "speed_rows", lambda cuda: [rows.Row("5 kernel speed", "b", rows.SKIP, "-")])
    seen = []
    ctx = Context(cuda=False, work="unused")
    run_sections(ctx, ["1", "5"], after_each=lambda done: seen.append([r.check for r in done]))
    assert seen == [["a"], ["a", "b"]]  # a run killed after section 1 still has its row on disk
    assert Context(cuda=False, work="", deadline=time.monotonic() + 1000).timeout(300) == 300
    with pytest.raises(RuntimeError, match=r"not started: (29|30) s of --budget-s left"):
        Context(cuda=False, work="", deadline=time.monotonic() + 30).timeout(300)


def _wheel(folder, name, version, module, top_level=True):
    """A minimal pure-Python wheel installing ``module`` (VALUE = version)."""
    path = os.path.join(folder, f"{name}-{version}-py3-none-any.whl")
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{module}/__init__.py", f"VALUE = {version!r}\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        if top_level:
            z.writestr(f"{info}/top_level.txt", module + "\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_wheel_names_and_modules(tmp_path):
    assert wheels.wheel_name("megatron_core-0.16.1-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl") \
        == ("megatron-core", "0.16.1")
    assert wheels.wheel_name("/x/Foo.Bar-1.0-1build-py3-none-any.whl") == ("foo-bar", "1.0")
    with pytest.raises(ValueError, match="notawheel.zip: not a wheel file name"):
        wheels.wheel_name("notawheel.zip")
    assert wheels.top_level_modules(_wheel(tmp_path, "gcx_a", "1.0", "gcx_mod_a")) == ["gcx_mod_a"]
    assert wheels.top_level_modules(_wheel(tmp_path, "gcx_b", "1.0", "gcx_mod_b", top_level=False)) == ["gcx_mod_b"]


def test_ensure_wheels_installs_only_missing_modules(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    folder = tmp_path / "whl"
    folder.mkdir()
    assert "no wheels" in wheels.ensure_wheels(str(folder))
    _wheel(folder, "gcx_new", "2.5", "gcx_mod_new")
    _wheel(folder, "pyyaml_copy", "9.9", "yaml")  # yaml is importable here: must not be installed
    note = wheels.ensure_wheels(str(folder))
    assert note.startswith("installed gcx-new==2.5 into") and "pyyaml" not in note, note
    site = [p for p in sys.path if "site-py" in p][0]
    assert os.environ["PYTHONPATH"].split(os.pathsep) == [site, "/elsewhere"]
    assert sorted(os.listdir(site)) == ["gcx_mod_new", "gcx_new-2.5.dist-info"]
    import gcx_mod_new

    assert gcx_mod_new.VALUE == "2.5"
    assert "already importable" in wheels.ensure_wheels(str(folder))
    _wheel(folder, "gcx_new", "2.6", "gcx_mod_new")
    with pytest.raises(ValueError, match="two versions of gcx-new"):
        wheels.ensure_wheels(str(folder))


def test_verdicts_cannot_pass_vacuously():
    assert rows.at_most("s", "c", float("nan"), 1.0).status == "FAIL"
    assert rows.at_most("s", "c", None, 1.0).status == "FAIL"
    assert rows.at_least("s", "c", 0.5, 0.2).status == "PASS"
    assert rows.exit_code([rows.skipped("s", "c", "why")]) == 1  # all SKIP proves nothing
    assert rows.exit_code([rows.at_most("s", "c", 0.0, 0.0), rows.skipped("s", "d", "why")]) == 0
    assert rows.guarded("s", "c", lambda: 1 / 0).result.startswith("ZeroDivisionError")
    x = torch.randn(4, 5, dtype=torch.float64)
    assert rows.rel_error(x, x) == 0.0
    try:
        rows.set_self_test(True)
        assert rows.rel_error(x, x) == pytest.approx(0.9)
        assert rows.at_most("s", "c", 0.5, 0.99, tighten=True).status == "FAIL"
        assert rows.at_least("s", "c", 0.5, 0.2).status == "FAIL"
    finally:
        rows.set_self_test(False)


class _WrongScale(kernels.blocks.CpuFlashKernel):
    """The CPU kernel with a 1 % scale error: the kind of bug section 1 exists to catch."""

    @staticmethod
    def forward(q, k, v, causal, scale):
        return kernels.blocks.CpuFlashKernel.forward(q, k, v, causal, scale * 1.01)


def test_section1_fails_a_wrong_kernel_and_a_wrong_choice(monkeypatch):
    label, device, dtype, expected, tol = kernels.KERNELS[0]
    case = kernels.CASES[0]
    assert kernels._exact_row(label, device, dtype, expected, tol, case).status == "PASS"
    monkeypatch.setattr(kernels.blocks, "select_kernel", lambda d, t: _WrongScale)
    row = kernels._exact_row(label, device, dtype, expected, tol, case)
    assert row.status == "FAIL" and row.figure > 100 * tol, row
    monkeypatch.setattr(kernels.blocks, "select_kernel", lambda d, t: kernels.blocks.DenseFallbackKernel)
    row = kernels._exact_row(label, device, dtype, expected, tol, case)
    assert row.status == "FAIL" and "chose dense_fallback" in row.result


def test_sections_and_peaks():
    assert parse_sections("3,1,4") == ["1", "3", "4"]
    with pytest.raises(ValueError, match="unknown \\['7'\\]"):
        parse_sections("1,7")
    with pytest.raises(ValueError, match="reads section 3's checkpoint"):
        parse_sections("4")
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("Tesla T4") is None


def _records(losses, first_iteration=1, **extra):
    return [{"iteration": first_iteration + i, "loss": x, **extra} for i, x in enumerate(losses)]


@pytest.mark.parametrize("cuda", [False, True])
def test_resume_verdicts(cuda):
    from bench.gpu_check.training import resume_verdicts

    names = ["run", "it 11", "it 11-20"]
    full = _records([7.0 - 0.05 * i for i in range(20)])
    same = _records([r["loss"] for r in full[10:]], 11)
    assert [r.status for r in resume_verdicts(names, full, same, True, cuda)] == ["PASS"] * 3
    drift = _records([r["loss"] + (0 if i == 0 else 5e-3) for i, r in enumerate(full[10:])], 11)
    # a CUDA run may drift by < 1e-2 after the first resumed iteration; a CPU run may not
    assert [r.status for r in resume_verdicts(names, full, drift, True, cuda)] == \
        ["PASS", "PASS", "PASS" if cuda else "FAIL"]
    first_off = _records([full[10]["loss"] + 1e-6] + [r["loss"] for r in full[11:]], 11)
    assert resume_verdicts(names, full, first_off, True, cuda)[1].status == "FAIL"
    restarted = _records([r["loss"] for r in full[:10]], 1)  # ignored the checkpoint: started over
    assert [r.status for r in resume_verdicts(names, full, restarted, True, cuda)][1:] == ["FAIL", "FAIL"]
    flat = _records([7.0] * 20)
    assert resume_verdicts(names, flat, _records([7.0] * 10, 11), True, cuda)[0].status == "FAIL"
    assert all(r.status == "FAIL" for r in resume_verdicts(names, full[:19], same, True, cuda))


def test_mfu_row():
    from bench.gpu_check.training import MFU_FLOOR, mfu_row

    recs = [{"tflops_per_rank": t, "ms_per_iter": 500.0, "peak_mem_mib": 50 * 1024} for t in (390, 400, 9000)]
    row = mfu_row("1B", recs, 1000.0)
    assert row.status == "PASS" and row.figure == pytest.approx(0.4) and "400 TFLOP/s" in row.result
    assert mfu_row("1B", recs, 400.0 / (0.9 * MFU_FLOOR)).status == "FAIL"
    assert mfu_row("1B", [], 1000.0).status == "FAIL"


def test_section5_flow_on_cpu_stand_ins(monkeypatch):
    """Section 5's code path (inputs, both kernels, ratios) with CPU tensors and a wall-clock
    timer standing in for CUDA: it must produce three PASS rows with sane TFLOP/s text."""
    import time

    import bench.common

    monkeypatch.setattr(kernels, "SPEED_SHAPE", dict(b=1, s=256, h=4, d=32))
    monkeypatch.setattr(kernels, "_speed_inputs", lambda: [torch.randn(1, 256, 4, 32) for _ in range(4)])

    def wall(fn, reps=3, warmup=1):
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps

    monkeypatch.setattr(bench.common, "cuda_time", wall)
    monkeypatch.setattr(kernels, "SPEED_FLOOR_FLASH", 1e-3)  # CPU timings are noise; the flow is the point
    monkeypatch.setattr(kernels, "SPEED_FLOOR_DEFAULT", 1e-3)
    out = kernels.speed_rows(cuda=True)
    assert [r.status for r in out] == ["PASS"] * 3, out
    assert all("TFLOP/s" in r.result and r.figure > 0 for r in out)
