"""A trusted plug-in that fails to import, or calls ``sys.exit``: one line, never exit 0, in every command."""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
from pathlib import Path

import pytest

from gia_bench.cli import app
from gia_bench.defenses import create
from gia_bench.errors import PluginError, SpecError
from gia_bench.registry import trusted

GOOD = '''
import sys
import torch
from gia_bench.defenses.base import Compressor, check_messages, flatten, unflatten

QUIT = False  # a test sets it: decode then calls sys.exit(0)


class Halver(Compressor):
    """fp32 all-reduce of half the gradient.

    Args:
        scale: factor applied before sending.
    """

    def __init__(self, scale: float = 0.5):
        self.scale = scale

    def step(self, grads, comm, keys=None):
        flat = flatten(grads) * self.scale
        comm.all_reduce(flat, "half")
        return unflatten(flat / self.scale / comm.world_size, [g.shape for g in grads])

    def decode(self, messages, shapes, public=None):
        if QUIT:
            sys.exit(0)
        check_messages(messages, ["half"], "Halver")
        return unflatten(messages["half"].to(torch.float32) / self.scale, shapes)
'''


def _module(folder: Path, name: str, body: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(body), encoding="utf-8")
    importlib.invalidate_caches()


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """A folder of plug-in modules on sys.path (the user's PYTHONPATH); modules imported here are forgotten after."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    before = set(sys.modules)
    yield folder
    for name in set(sys.modules) - before:
        if sys.modules[name] is not None and str(getattr(sys.modules[name], "__file__", "")).startswith(str(folder)):
            del sys.modules[name]


def _run(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        app(args, prog_name="gia-bench")
    return info.value.code, capsys.readouterr().err


def _commands(name: str, out: Path) -> dict[str, list[str]]:
    """Each command that takes a module:Class, naming the plug-in ``name`` (module ``name``, class ``Comp``)."""
    return {
        "capture": ["capture", "--defense", f"{name}:Comp", "--num", "1", "--out", str(out / "capture")],
        "attack": ["attack", str(out), "--attack", f"{name}:Comp", "--plugin", f"{name}:Comp"],
        "audit": ["audit", f"{name}:Comp", "--out", str(out / "audit"), "--quick"],
        "train": ["train", "--defense", f"{name}:Comp", "--out", str(out / "train"), "--epochs", "1"],
        "federated": ["federated", "--defense", f"{name}:Comp", "--out", str(out / "federated")],
    }


@pytest.mark.parametrize("command", ["capture", "attack", "audit", "train", "federated"])
@pytest.mark.parametrize(
    "body, words",
    [
        ("raise RuntimeError('no licence server')\n", ["RuntimeError", "no licence server"]),
        ("import sys\nsys.exit(0)\n", ["sys.exit(0)"]),
    ],
    ids=["raises", "exits"],
)
def test_plugin_failing_at_import_is_one_line_exit_2(plugins, tmp_path, capsys, command, body, words):
    if command == "federated":
        pytest.importorskip("flwr")  # without Flower, federated stops earlier (saying what to install)
    name = f"broken_{command}_{words[0][:3].lower().strip('.')}"
    _module(plugins, name, body)
    code, err = _run(_commands(name, tmp_path)[command], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert name in lines[0] and all(w in lines[0] for w in words), lines[0]


def test_plugin_calling_sys_exit_in_a_method_is_an_error_not_exit_0(plugins, tmp_path, capsys):
    """`attack` runs the record's defense's decode: its sys.exit(0) must not end the command with success."""
    _module(plugins, "quitter", GOOD)
    records = tmp_path / "records"
    code, err = _run(["capture", "--defense", "quitter:Halver", "--num", "1", "--out", str(records)], capsys)
    assert code in (0, None), err
    assert list(records.glob("*.safetensors"))
    sys.modules["quitter"].QUIT = True
    code, err = _run(
        ["attack", str(records), "--attack", "dlg:iterations=1", "--plugin", "quitter:Halver", "--out", str(tmp_path / "runs")],
        capsys,
    )
    assert code == 2, err
    assert "sys.exit(0)" in err and "Traceback" not in err


def test_plugin_in_the_current_folder_names_the_fix(tmp_path, monkeypatch):
    """A console script does not put the current folder on sys.path: say so, and how to fix it."""
    monkeypatch.chdir(tmp_path)
    cwd = os.getcwd()
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", cwd)])
    _module(tmp_path, "mycomp_here", GOOD)
    with trusted(["mycomp_here:RandK"]), pytest.raises(PluginError) as info:
        create("mycomp_here:RandK")
    message = str(info.value)
    assert "current folder is not on sys.path" in message and "PYTHONPATH=." in message
    assert "mycomp_here" not in sys.modules

    # no such file here: a plain 'no module named', still pointing at PYTHONPATH
    with trusted(["mycomp_elsewhere:RandK"]), pytest.raises(PluginError) as info:
        create("mycomp_elsewhere:RandK")
    message = str(info.value)
    assert "no module named 'mycomp_elsewhere'" in message and "PYTHONPATH" in message
    assert "current folder" not in message


def test_a_missing_dependency_of_the_plugin_is_named_as_such(plugins):
    """The plug-in's module exists but imports something missing: name that, not the plug-in."""
    _module(plugins, "needs_dep", "import no_such_dependency_xyz\n")
    with trusted(["needs_dep:Comp"]), pytest.raises(SpecError) as info:
        create("needs_dep:Comp")
    assert "no_such_dependency_xyz" in str(info.value) and "ModuleNotFoundError" in str(info.value)
