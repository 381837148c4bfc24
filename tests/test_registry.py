import subprocess
import sys

import pytest

from gia_bench.defenses import DEFENSES, create
from gia_bench.errors import SpecError
from gia_bench.registry import PLUGINS_ENV, Registry, is_trusted, parse_spec, trusted


class Toy:
    """A toy component.

    Args:
        rank: the rank.
        alpha: a number.
        flag: a switch.
        mode: a word.
        limit: optional cap.
    """

    def __init__(self, rank: int = 1, alpha: float = 1.0, flag: bool = True, mode: str = "a", limit: int | None = None):
        self.rank, self.alpha, self.flag, self.mode, self.limit = rank, alpha, flag, mode, limit


def test_parse_spec_forms():
    assert parse_spec("topk").name == "topk"
    s = parse_spec("lqsgd:rank=2,bits=8,alpha=10")
    assert s.name == "lqsgd" and s.kwargs == {"rank": "2", "bits": "8", "alpha": "10"}
    s = parse_spec("pkg.mod:Class:k=3")
    assert s.name == "pkg.mod:Class" and s.kwargs == {"k": "3"}
    assert parse_spec("pkg.mod:Class").name == "pkg.mod:Class"
    assert str(parse_spec("x:a=1,b=2")) == "x:a=1,b=2"


def test_spec_converts_to_constructor_types():
    reg = Registry("toy")
    reg.register("toy")(Toy)
    t = reg.create("toy:rank=3,alpha=0.5,flag=false,limit=none")
    assert (t.rank, t.alpha, t.flag, t.limit) == (3, 0.5, False, None)
    assert reg.create("toy:limit=7").limit == 7


@pytest.mark.parametrize(
    "spec, words",
    [
        ("toy:bogus=1", ["bogus", "accepted", "rank", "alpha"]),
        ("toy:rank=two", ["rank", "'two'", "integer"]),
        ("toy:flag=maybe", ["flag", "boolean"]),
        ("toy:rank", ["key=value"]),
        ("nosuch", ["unknown", "toy"]),
        ("nosuchmodule_xyz:Cls", ["not trusted", "--plugin nosuchmodule_xyz:Cls"]),
    ],
)
def test_bad_specs_name_what_is_wrong(spec, words):
    reg = Registry("toy")
    reg.register("toy")(Toy)
    with pytest.raises(SpecError) as info:
        reg.create(spec)
    for w in words:
        assert w in str(info.value)


def test_trusted_module_that_does_not_import_names_it():
    reg = Registry("toy")
    with trusted(["nosuchmodule_xyz:Cls"]), pytest.raises(SpecError, match="cannot import"):
        reg.create("nosuchmodule_xyz:Cls")


def test_module_class_spec_and_canonical_spec():
    reg = Registry("toy")
    with trusted(["test_registry:Toy"]):
        t = reg.create("test_registry:Toy:rank=4")
    assert isinstance(t, Toy) and t.rank == 4


# -- trust: a module:Class runs only when the user trusted it, and only if it is the right kind ----


def test_untrusted_module_class_is_refused_without_importing(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "evil_plugin_xyz.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Comp: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SpecError, match="not trusted.*--plugin evil_plugin_xyz:Comp"):
        DEFENSES.create("evil_plugin_xyz:Comp")
    assert not marker.exists() and "evil_plugin_xyz" not in sys.modules


def test_trusted_class_of_the_wrong_kind_is_never_called(tmp_path):
    marker = tmp_path / "ran"
    spec = f"subprocess:Popen:args=touch {marker},shell=true"
    for plugins in ([], ["subprocess:Popen"]):
        with trusted(plugins), pytest.raises(SpecError) as info:
            DEFENSES.create(spec)
        assert ("Compressor subclass" in str(info.value)) == bool(plugins), str(info.value)
    assert not marker.exists()


def test_trusted_subclass_resolves_and_trust_ends_with_the_block():
    reg = Registry("toy", base=Toy)
    with trusted(["test_registry:Toy"]) as names:
        assert names == ("test_registry:Toy",) and is_trusted("test_registry:Toy")
        assert reg.create("test_registry:Toy:rank=2").rank == 2
    assert not is_trusted("test_registry:Toy")
    with pytest.raises(SpecError, match="not trusted"):
        reg.create("test_registry:Toy")


def test_trust_reaches_child_processes_through_the_environment():
    code = "from gia_bench.registry import is_trusted; print(is_trusted('mypkg.mod:Comp'))"
    with trusted(["mypkg.mod:Comp:k=1"]):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.strip() == "True"
    import os

    assert PLUGINS_ENV not in os.environ


@pytest.mark.parametrize("bad", ["os", "os.system", "a b:C", ":Class", "mod:"])
def test_plugin_flag_must_name_module_and_class(bad):
    with pytest.raises(SpecError, match="--plugin"), trusted([bad]):
        pass


def test_defense_spec_round_trips():
    for name in DEFENSES.names():
        comp = create(name)
        again = create(comp.spec)
        assert type(again) is type(comp)
        assert again.spec == comp.spec


def test_study_file_names_only_trusted_code(tmp_path):
    from typer.testing import CliRunner

    from gia_bench.cli import app
    from gia_bench.errors import ConfigError
    from gia_bench.study import StudyOptions, parse_study

    raw = {"datasets": ["digits"], "models": ["lenet"], "defenses": ["test_registry:ToyCompressor"], "attacks": ["dlg"]}
    with pytest.raises(ConfigError, match="not trusted"):
        parse_study(raw)
    with trusted(["test_registry:ToyCompressor"]):
        assert parse_study(raw).defenses == ("test_registry:ToyCompressor",)
    assert StudyOptions(plugins=("a.b:C",)).plugins == ("a.b:C",)
    study = tmp_path / "s.toml"
    study.write_text('datasets = ["digits"]\nmodels = ["lenet"]\ndefenses = ["test_registry:ToyCompressor"]\nattacks = ["dlg"]\n')
    res = CliRunner().invoke(app, ["study", "run", str(study), "--out", str(tmp_path / "o")])
    assert isinstance(res.exception, ConfigError) and "--plugin test_registry:ToyCompressor" in str(res.exception)


from gia_bench.defenses.none import NoCompression  # noqa: E402


class ToyCompressor(NoCompression):
    """A third party's compressor (plain gradients under another name)."""
