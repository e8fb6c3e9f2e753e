"""Every command the README and docs/ show must still work.

Blocks fenced as ```bash runnable are executed from the repository root and must exit 0
(cheap commands only: --help, plans, dry runs). In every other ```bash block, each command
that runs one of our modules is handed to that module's own argument parser, which must
accept it: a flag that does not exist fails. The convention is documented in docs/index.md.
"""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = ("data_tools", "megatron_ext", "launch", "bench")
FENCE = re.compile(r"^```bash([^\n`]*)\n(.*?)^```", re.M | re.S)


def doc_files():
    docs = os.path.join(REPO, "docs")
    return [os.path.join(REPO, "README.md")] + sorted(
        os.path.join(docs, f) for f in os.listdir(docs) if f.endswith(".md"))


def bash_blocks(path):
    """-> [(line number, runnable, [command lines])]: continuations joined, comments dropped."""
    text = open(path).read()
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 2
        runnable = "runnable" in m.group(1).split()
        commands = [c.strip() for c in m.group(2).replace("\\\n", " ").splitlines()]
        out.append((line, runnable, [c for c in commands if c and not c.startswith("#")]))
    return out


def _tokens(command):
    words = shlex.split(command, comments=True)
    env = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    cleaned = []
    for w in words:
        if w == "...":  # arguments left out; after an option it stands for that option's value
            if cleaned and cleaned[-1].startswith("--") and "=" not in cleaned[-1]:
                cleaned.append("PLACEHOLDER")
            continue
        w = w.lstrip("[").rstrip("]")  # optional parts are checked too
        if w:
            cleaned.append(w)
    return env, cleaned


def module_call(command):
    """-> ("module", name, argv) | ("make", target, []) | None for commands that are not ours."""
    env, words = _tokens(command)
    if not words:
        return None
    if words[0] == "make":
        return ("make", words[1] if len(words) > 1 else "", [])
    if words[0] in ("python", "python3") and len(words) > 2 and words[1] == "-m":
        return ("module", words[2], words[3:]) if words[2].split(".")[0] in OURS else None
    if words[0] == "torchrun" and ("-m" in words or "--module" in words):
        from torch.distributed.run import get_args_parser

        args = get_args_parser().parse_args(words[1:])  # torchrun's own flags must parse too
        if args.module and args.training_script.split(".")[0] in OURS:
            return ("module", args.training_script, list(args.training_script_args))
        return None
    if words[0] == "launch/torchrun.sh":  # extra arguments go to the trainer
        return ("module", "megatron_ext.train", ["--config", env.get("CONFIG", "PLACEHOLDER")] + words[1:])
    return None


def all_commands():
    for path in doc_files():
        for line, runnable, commands in bash_blocks(path):
            for c in commands:
                yield os.path.relpath(path, REPO), line, runnable, c


# Runs every parse in one interpreter: parse_args succeeds -> "ok", an argparse error -> its message.
_PARSE_ONLY = r"""
import argparse, contextlib, io, json, runpy, sys
class Parsed(BaseException): pass
init, parse = argparse.ArgumentParser.__init__, argparse.ArgumentParser.parse_args
def __init__(self, *a, **k):
    k["allow_abbrev"] = False  # a documented flag must be spelled in full
    init(self, *a, **k)
def parse_args(self, *a, **k):
    parse(self, *a, **k)
    raise Parsed()
argparse.ArgumentParser.__init__, argparse.ArgumentParser.parse_args = __init__, parse_args
results = []
for module, argv in json.load(sys.stdin):
    sys.argv = [module] + argv
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        results.append("main returned without parsing arguments")
    except Parsed:
        results.append("ok")
    except SystemExit as e:
        results.append("ok" if e.code in (0, None) else f"exit {e.code}: {err.getvalue().strip()[-600:]}")
    except BaseException as e:
        results.append(f"{type(e).__name__}: {e}")
print(json.dumps(results))
"""


def _env():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def test_docs_have_runnable_and_checked_commands():
    cmds = list(all_commands())
    assert any(r for *_, r, _c in cmds), "no ```bash runnable block found"
    assert sum(module_call(c) is not None for *_, c in cmds) >= 30


def test_documented_flags_parse():
    calls, where = [], []
    failures = []
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", open(os.path.join(REPO, "Makefile")).read(), re.M))
    for doc, line, _, command in all_commands():
        call = module_call(command)
        if call is None:
            continue
        kind, name, argv = call
        if kind == "make":
            if name not in targets:
                failures.append(f"{doc}:{line}: `make {name}`: no such Makefile target")
            continue
        calls.append((name, argv))
        where.append(f"{doc}:{line}: `{command}`")
    res = subprocess.run([sys.executable, "-c", _PARSE_ONLY], input=json.dumps(calls), capture_output=True,
                         text=True, timeout=120, cwd=REPO, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    for place, result in zip(where, json.loads(res.stdout.strip().splitlines()[-1])):
        if result != "ok":
            failures.append(f"{place}: {result}")
    assert not failures, "\n".join(failures)


def test_parse_check_catches_a_flag_that_does_not_exist():
    """The checker itself must be able to fail."""
    calls = [("megatron_ext.plan", ["--config", "x.yaml", "--gpus", "64", "--no-such-flag"]),
             ("megatron_ext.plan", ["--config", "x.yaml", "--gpus", "64", "--gpu", "H100"]),
             ("megatron_ext.plan", ["--config", "x.yaml", "--gpus", "64", "--gpus-per", "8"])]  # abbreviated: refused
    res = subprocess.run([sys.executable, "-c", _PARSE_ONLY], input=json.dumps(calls), capture_output=True,
                         text=True, timeout=60, cwd=REPO, env=_env())
    results = json.loads(res.stdout.strip().splitlines()[-1])
    assert results[0].startswith("exit 2") and "--no-such-flag" in results[0]
    assert results[1] == "ok"
    assert results[2].startswith("exit 2"), results[2]


RUNNABLE = [(doc, line, c) for doc, line, r, c in all_commands() if r]


@pytest.mark.parametrize("doc,line,command", RUNNABLE, ids=[f"{d}:{n}" for d, n, _ in RUNNABLE])
def test_runnable_commands_run(doc, line, command):
    res = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60, cwd=REPO, env=_env())
    assert res.returncode == 0, f"{doc}:{line}: `{command}` exited {res.returncode}\n{res.stderr[-2000:]}"


# Pages other branches add (docs/index.md links them already); a link to one is fine until it lands.
PENDING = {"gpu.md", "checkpoints.md", "checkpoint-memory.md", "training-gpu.md"}
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_and_anchors_resolve():
    failures = []
    for path in doc_files():
        text = open(path).read()
        for m in LINK.finditer(text):
            target = m.group(1)
            if re.match(r"^[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            where = f"{os.path.relpath(path, REPO)}:{text.count(chr(10), 0, m.start()) + 1}: ({target})"
            if not os.path.exists(full):
                if os.path.basename(full) not in PENDING:
                    failures.append(f"{where}: no such file")
                continue
            if anchor:
                headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", open(full).read(), flags=re.M | re.S),
                                      re.M)
                if anchor not in {_slug(h) for h in headings}:
                    failures.append(f"{where}: no heading with anchor #{anchor}")
    assert not failures, "\n".join(failures)
