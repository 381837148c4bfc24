"""gia_bench.io: the one atomic writer and the one slug."""

from __future__ import annotations

import json
import os
import stat

import pytest

from gia_bench.io import atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text, slug


def test_writes_replace_whole_files_with_ordinary_permissions(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic_write_json(path, {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "keep.txt"
    atomic_write_text(path, "old")

    def broken(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_slug_keeps_safe_names_and_each_callers_rules():
    # the names files already have: record ids, attack slugs, study folders
    assert slug("pkg.mod:Class", keep="A-Za-z0-9_.-", fill="_", strip="._", default="x") == "pkg.mod_Class"
    assert slug("ig_iterations-2000") == "ig_iterations-2000"
    assert slug("a/ b", runs=True) == "a-b" and slug("a/ b", runs=False) == "a--b"
    assert slug("...", strip=".", default="record") == "record"
    for text in ("x" * 300 + "/1", "x" * 300 + "/2"):
        name = slug(text, limit=120)
        assert len(name) == 120 and set(name) <= set("x-0123456789abcdef")
    # two long names that share their first 120 characters stay apart
    assert slug("x" * 300 + "/1", limit=120) != slug("x" * 300 + "/2", limit=120)
    assert all(c.isalnum() or c in "._+-" for c in slug("ä b\tc:d=e,f@g*h/i"))
