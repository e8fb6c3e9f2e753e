"""The demo's corpus step, alone: Debian changelogs when there are 50, else Python's own docs."""
import gzip
import json

from megatron_ext import demo


def test_falls_back_to_python_docs_without_changelogs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "CHANGELOGS", str(tmp_path / "none" / "*" / "changelog*.gz"))
    path = str(tmp_path / "docs.jsonl")
    what = demo.corpus(path, max_docs=120)
    docs = [json.loads(line)["text"] for line in open(path)]
    notice = [line for line in capsys.readouterr().out.splitlines() if line.startswith("demo:")]
    assert what == "120 Python stdlib docs" and len(docs) == 120
    assert len(notice) == 1 and "standard-library" in notice[0]
    assert all(len(d) >= 500 for d in docs) and sum(map(len, docs)) > 300_000


def test_uses_changelogs_when_there_are_50(tmp_path, monkeypatch, capsys):
    for i in range(50):
        (tmp_path / f"pkg{i}").mkdir()
        with gzip.open(tmp_path / f"pkg{i}" / "changelog.Debian.gz", "wt") as f:
            f.write(f"pkg{i} (1.0) unstable; urgency=low\n")
    monkeypatch.setattr(demo, "CHANGELOGS", str(tmp_path / "*" / "changelog*.gz"))
    assert demo.corpus(str(tmp_path / "docs.jsonl")) == "50 Debian changelogs"
    assert "demo:" not in capsys.readouterr().out
