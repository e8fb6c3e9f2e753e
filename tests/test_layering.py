"""The layer rules of DESIGN.md, checked by parsing every import (module level and inside
functions): data_tools -> sharding/rope/attention -> megatron/ -> train/eval/convert/plan -> launch."""
import ast
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
UPPER = ["megatron_ext.train", "megatron_ext.eval", "megatron_ext.convert", "megatron_ext.plan",
         "megatron_ext.experiments", "launch"]
RULES = [  # (modules the rule covers, imports they must never make)
    (["data_tools"], ["megatron_ext", "megatron", "launch"]),
    (["megatron_ext.sharding", "megatron_ext.rope", "megatron_ext.attention", "megatron_ext.distributed"],
     ["megatron", "megatron_ext.megatron"] + UPPER),
    (["megatron_ext.megatron"], UPPER),
    (["megatron_ext.train", "megatron_ext.eval", "megatron_ext.convert", "megatron_ext.plan"], ["launch"]),
]


def _module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: pathlib.Path, root: pathlib.Path = ROOT):
    """(line, absolute module name) for every import in ``path``, relative ones resolved."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                target = ".".join(p for p in (base, node.module) if p)
            else:
                target = node.module
            yield node.lineno, target
            yield from ((node.lineno, ".".join(p for p in (target, a.name) if p)) for a in node.names)


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(root: pathlib.Path):
    """'file:line imports name' for every import under ``root`` that points up a layer."""
    broken = []
    for path in [p for top in ("data_tools", "megatron_ext") for p in (root / top).rglob("*.py")]:
        module = _module_name(path, root)
        for covered, forbidden in RULES:
            if _under(module, covered):
                broken += [f"{path.relative_to(root)}:{line} imports {name}"
                           for line, name in imported_names(path, root) if _under(name, forbidden)]
    return broken


def test_imports_never_point_up():
    assert len(list((ROOT / "megatron_ext").rglob("*.py"))) > 20
    broken = violations(ROOT)
    assert not broken, "imports pointing up a layer:\n" + "\n".join(broken)


def test_the_checker_sees_relative_and_function_level_imports(tmp_path):
    (tmp_path / "data_tools").mkdir()
    (tmp_path / "data_tools" / "pre.py").write_text("def f():\n    from megatron_ext.sysinfo import peak\n")
    (tmp_path / "megatron_ext").mkdir()
    (tmp_path / "megatron_ext" / "rope.py").write_text("from . import megatron as quiet\nimport torch\n")
    assert sorted(violations(tmp_path)) == ["data_tools/pre.py:2 imports megatron_ext.sysinfo",
                                            "data_tools/pre.py:2 imports megatron_ext.sysinfo.peak",
                                            "megatron_ext/rope.py:1 imports megatron_ext.megatron"]


def test_importing_the_mcore_adapter_installs_no_warning_filter():
    code = ("import warnings; before = list(warnings.filters); import megatron_ext.megatron.model; "
            "assert warnings.filters == before, 'megatron_ext.megatron changed the global warning filters'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("dim,factor", [(128, 8.0), (64, 50.0), (16, 4.0)])
def test_yarn_ramp_matches_megatron_core(dim, factor):
    from megatron.core.models.common.embeddings import yarn_rotary_pos_embedding as yarn

    from megatron_ext.rope import RopeConfig, yarn_keep_mask

    cfg = RopeConfig(scaling="yarn", factor=factor)
    low, high = yarn._yarn_find_correction_range(cfg.yarn_beta_fast, cfg.yarn_beta_slow, dim, cfg.base,
                                                 cfg.original_max_position)
    want = 1.0 - yarn._yarn_linear_ramp_mask(low, high, dim // 2, device="cpu").double()
    assert torch.equal(yarn_keep_mask(dim, cfg), want)


def test_every_declared_pytest_marker_is_used():
    """A marker in pytest.ini (and its README claim) must mark some test, or it promises nothing."""
    import configparser
    import re

    ini = configparser.ConfigParser()
    ini.read(ROOT / "pytest.ini")
    declared = [line.split(":")[0].strip() for line in ini.get("pytest", "markers", fallback="").splitlines()
                if line.strip()]
    sources = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    unused = [m for m in declared if not re.search(rf"pytest\.mark\.{m}\b", sources)]
    assert not unused, f"markers declared in pytest.ini but on no test: {unused}"
