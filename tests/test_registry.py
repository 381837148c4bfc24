import pytest

from gia_bench.defenses import DEFENSES, create
from gia_bench.errors import SpecError
from gia_bench.registry import Registry, parse_spec


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
        ("nosuchmodule_xyz:Cls", ["cannot import"]),
    ],
)
def test_bad_specs_name_what_is_wrong(spec, words):
    reg = Registry("toy")
    reg.register("toy")(Toy)
    with pytest.raises(SpecError) as info:
        reg.create(spec)
    for w in words:
        assert w in str(info.value)


def test_module_class_spec_and_canonical_spec():
    reg = Registry("toy")
    t = reg.create("test_registry:Toy:rank=4")
    assert isinstance(t, Toy) and t.rank == 4


def test_defense_spec_round_trips():
    for name in DEFENSES.names():
        comp = create(name)
        again = create(comp.spec)
        assert type(again) is type(comp)
        assert again.spec == comp.spec
