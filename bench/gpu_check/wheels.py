"""Wheels carried to a machine without network (``make gpu-wheels`` fills ``.whl/``).

Only the wheels whose top-level module is missing are installed, with
``pip install --no-index --no-deps --target``, into a folder beside them that is then
put first on ``sys.path`` and ``PYTHONPATH`` (for the subprocesses: torchrun, CPU-only
references). Nothing here imports torch: it runs before anything does.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from typing import List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WHEEL_DIR = os.path.join(REPO, ".whl")
_WHEEL = re.compile(r"^(?P<name>[A-Za-z0-9_.]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")


def wheel_name(filename: str) -> Tuple[str, str]:
    """(normalised distribution name, version) of a wheel file name (PEP 427);
    ValueError naming the file when it is not one."""
    m = _WHEEL.match(os.path.basename(filename))
    if not m:
        raise ValueError(f"{filename}: not a wheel file name (name-version[-build]-python-abi-platform.whl)")
    return re.sub(r"[-_.]+", "-", m["name"]).lower(), m["version"]


def top_level_modules(wheel: str) -> List[str]:
    """The importable top-level names a wheel installs: its ``top_level.txt``, else the
    first path parts of its files (``.dist-info``/``.data`` folders left out)."""
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        listed = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        if listed:
            mods = z.read(listed[0]).decode().split()
        else:
            parts = {n.split("/")[0] for n in names}
            mods = [p[:-3] if p.endswith(".py") else p for p in parts
                    if not p.endswith((".dist-info", ".data")) and not p.endswith((".so", ".pyd", ".pth"))]
    mods = sorted({m for m in mods if m and not m.startswith("_")})
    if not mods:
        raise ValueError(f"{wheel}: no importable top-level module found")
    return mods


def _use(site: str) -> None:
    if site not in sys.path:
        sys.path.insert(0, site)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if site not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([site] + parts)
    importlib.invalidate_caches()


def _missing(wheels: List[str]) -> List[str]:
    return [w for w in wheels if any(importlib.util.find_spec(m) is None for m in top_level_modules(w))]


def ensure_wheels(wheel_dir: str = WHEEL_DIR, python: str = sys.executable) -> str:
    """Install the wheels in ``wheel_dir`` whose modules this Python lacks; returns what it did.
    Two versions of one distribution are refused (pip would stop on them anyway)."""
    wheels = sorted(os.path.join(wheel_dir, f) for f in os.listdir(wheel_dir)
                    if f.endswith(".whl")) if os.path.isdir(wheel_dir) else []
    if not wheels:
        return f"no wheels in {os.path.relpath(wheel_dir, REPO)}/ (the modules must be installed)"
    seen = {}
    for w in wheels:
        name, version = wheel_name(w)
        if name in seen:
            raise ValueError(f"{wheel_dir}: two versions of {name} ({seen[name]}, {version}); keep one")
        seen[name] = version
    site = os.path.join(wheel_dir, f"site-py{sys.version_info.major}{sys.version_info.minor}")
    if os.path.isdir(site):
        _use(site)  # installed by an earlier run on this machine
    missing = _missing(wheels)
    if not missing:
        return f"{len(wheels)} wheel(s) in .whl/, every module already importable"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", site, *missing], check=True)
    _use(site)
    still = _missing(missing)
    if still:
        raise RuntimeError(f"installed {still} into {site}, but their modules still do not import")
    return "installed " + ", ".join("==".join(wheel_name(w)) for w in missing) + f" into {os.path.relpath(site, REPO)}"
