"""A record's messages are what its defense sends at its step with its workers (gia_bench.layout).

The probe cases of issue #30 (a plain fp32 record relabelled as another defense at step 1 or with two
workers, 8-bit LQ-SGD codes relabelled 4-bit, world sizes that are not world sizes) are refused with
one line naming the file; genuine records of every family, from captures at step 0, captures after
warm steps and multi-worker training steps, are accepted (the positive controls). A hypothesis test
relabels records among the built-in families and settings: a claim whose layout differs from what
the record's defense sent is refused, a claim whose messages are identical is accepted.
"""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from record_layout_fixtures import SPECS, capture, relabel, train_records

from gia_bench.defenses import create
from gia_bench.errors import RecordError
from gia_bench.layout import FAMILIES
from gia_bench.records import GradientRecord
from gia_bench.receiver import MESSAGE_CHECKS, load_record
from gia_bench.registry import parse_spec


def _refused(path: Path, *words: str) -> str:
    with pytest.raises(RecordError) as info:
        load_record(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


@functools.lru_cache(maxsize=None)
def _run(defense: str, world_size: int, root: str) -> dict[tuple[int, int], Path]:
    """A 3-step run of ``defense`` with ``world_size`` workers, written once per test session."""
    return train_records(defense, Path(root) / f"{defense.replace(':', '_')}-{world_size}", world_size)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("runs"))
    return lambda defense, world_size=2: _run(defense, world_size, root)


def _load(path: Path) -> GradientRecord:
    return GradientRecord.load(path, validate=False)


# -- positive controls --------------------------------------------------------------------------------


def test_every_listed_family_is_covered():
    from gia_bench.defenses import DEFENSES

    builtin = {n for n in DEFENSES.names() if ":" not in n}
    assert builtin <= {parse_spec(s).name for s in SPECS}
    # the families whose layout a fresh step cannot tell are declared, with their content checks
    assert set(FAMILIES) == {"powersgd", "lqsgd", "laq", "tq", "rcfed"}
    assert {"tq", "rcfed", "laq", "topk", "mixedprec"} <= set(MESSAGE_CHECKS)


@pytest.mark.parametrize("defense", SPECS)
def test_genuine_records_are_accepted(tmp_path, runs, defense):
    """Capture at step 0, capture after 2 warm steps, and every rank of a 2-worker run at steps 0-2."""
    for warm in (0, 2):
        rec = load_record(capture(defense, warm).save(tmp_path / f"c{warm}.safetensors"))
        assert rec.meta.step == warm
    paths = runs(defense)
    for (step, rank), path in paths.items():
        rec = load_record(path)
        assert (rec.meta.step, rec.meta.extra["rank"], rec.meta.extra["world_size"]) == (step, rank, 2)
    name = parse_spec(defense).name
    if name in ("powersgd", "lqsgd") and "start_iter" not in defense:
        # mid-training: warm-started from the last Q, and the summed P a multi-worker decode needs
        assert {"Q_init", "P_sum"} == set(load_record(paths[2, 1]).public)


def test_lqsgd_with_eight_workers_goes_all_to_all_and_is_accepted(runs):
    paths = runs("lqsgd:rank=1,bits=8", 8)  # auto: bits x workers = 64, so all-to-all
    for rank in (0, 5, 7):
        rec = load_record(paths[1, rank])
        assert "P.reduced.codes" in rec.messages and rec.meta.extra["world_size"] == 8


def test_laq_sent_and_silent_workers_are_accepted(runs):
    paths = runs("laq:bits=4")
    silent, sent = load_record(paths[1, 0]), load_record(paths[1, 1])
    assert int(silent.messages["flag"][0]) == 0 and int(sent.messages["flag"][0]) == 1
    assert "codes" in silent.messages and not silent.messages["codes"].any()  # zeros beside a sender


# -- the probe cases ----------------------------------------------------------------------------------

_CLAIMS = ["lqsgd:rank=100000", "powersgd", "fp16"]


@pytest.mark.parametrize("claim", _CLAIMS)
def test_plain_record_relabelled_at_step_1_is_refused(tmp_path, claim):
    rec = capture("none")
    assert load_record(relabel(rec, tmp_path / "ok.safetensors", step=1)).meta.step == 1  # control
    _refused(relabel(rec, tmp_path / "r.safetensors", defense=claim, step=1), "not what defense", "at step 1")


@pytest.mark.parametrize("claim", _CLAIMS)
def test_plain_record_relabelled_with_two_workers_is_refused(tmp_path, runs, claim):
    genuine = _load(runs("none")[1, 1])
    _refused(relabel(genuine, tmp_path / "r.safetensors", defense=claim), "not what defense", "with 2 workers")
    # a one-worker capture that claims to come from a 2-worker training step
    two = {"source": "train", "world_size": 2, "rank": 0}
    rec = capture("none")
    assert load_record(relabel(rec, tmp_path / "ok.safetensors", extra=two, step=1))  # control: none is none
    _refused(relabel(rec, tmp_path / "w.safetensors", defense=claim, extra=two, step=1), "with 2 workers")


@pytest.mark.parametrize("where", ["capture step 0", "capture step 2", "2 workers step 2"])
def test_lqsgd_8_bit_codes_relabelled_4_bit_are_refused(tmp_path, runs, where):
    if where.startswith("capture"):
        rec = capture("lqsgd:rank=1,bits=8", int(where[-1]))
    else:
        rec = _load(runs("lqsgd:rank=1,bits=8")[2, 1])
    claim = create(rec.meta.defense, bits=4).spec
    assert load_record(relabel(rec, tmp_path / "ok.safetensors")).meta.defense == rec.meta.defense  # control
    msg = _refused(relabel(rec, tmp_path / "r.safetensors", defense=claim), "not what defense", "bits=4")
    assert "P.codes uint8" in msg


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"source": "train", "world_size": 0}, ["world_size", "[1, 4096]"]),
        ({"source": "train", "world_size": -1}, ["world_size", "[1, 4096]"]),
        ({"source": "train", "world_size": 10**9}, ["world_size", "[1, 4096]"]),
        ({"source": "train", "world_size": "2"}, ["world_size", "integer"]),
        ({"source": "train", "world_size": None}, ["world_size", "integer"]),
        ({"source": "train", "world_size": True}, ["world_size", "integer"]),
        ({"source": "train", "world_size": 2.0}, ["world_size", "integer"]),
        ({"source": "train", "world_size": 2, "rank": 2}, ["rank", "not below world_size 2"]),
        ({"world_size": 2}, ["world_size", "training run", "'capture'"]),
        ({"source": "somewhere"}, ["source", "one of"]),
        ({"surprise": 1}, ["extra", "undeclared", "surprise"]),
        ({"source": "federated", "round": 5, "client": 0}, ["round", "step 0 + 1"]),
        ({"checkpoint_sha256": "abc"}, ["checkpoint_sha256", "hex"]),
        ({"source": "train", "wire_bytes": 1}, ["wire_bytes", "bytes_sent"]),
    ],
)
def test_bad_extra_fields_are_refused(tmp_path, extra, words):
    rec = capture("none")
    _refused(relabel(rec, tmp_path / "r.safetensors", extra=extra), "record metadata 'extra", *words)


@pytest.mark.parametrize("step, words", [(-1, ["step", "[0, "]), (10**9 + 1, ["step", "1000000000"]),
                                         ("1", ["step", "integer"]), (None, ["step", "integer"])])  # fmt: skip
def test_bad_steps_are_refused(tmp_path, step, words):
    _refused(relabel(capture("none"), tmp_path / "r.safetensors", step=step), "record metadata 'step'", *words)


def test_cli_attack_on_a_relabelled_record_exits_2_with_one_line(tmp_path):
    path = relabel(capture("none"), tmp_path / "r.safetensors", defense="lqsgd:rank=100000", step=1)
    proc = subprocess.run(
        [sys.executable, "-m", "gia_bench", "attack", str(path), "--attack", "dlg:iterations=1", "--out",
         str(tmp_path / "runs")], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "not what defense" in lines[0] and "r.safetensors" in lines[0], lines[0]
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("result.json"))


# -- bytes and public state ---------------------------------------------------------------------------


def test_bytes_are_what_the_messages_take(tmp_path, runs):
    rec = _load(runs("qsgd:levels=16")[1, 0])
    free = tuple({**m, "nbytes": 0} for m in rec.meta.messages)
    extra = {**rec.meta.extra, "wire_messages": list(free), "wire_bytes": 0}
    _refused(relabel(rec, tmp_path / "a.safetensors", messages=free, bytes_sent=0, extra=extra),
             "declares 0 bytes sent", "among 2 workers")  # fmt: skip
    # a capture's payload bytes are not what a 3-worker ring all-reduce sends
    three = {"source": "train", "world_size": 3, "rank": 0}
    _refused(relabel(capture("none"), tmp_path / "b.safetensors", extra=three), "all_reduce", "among 3 workers")


def test_public_state_is_what_the_defense_leaves(tmp_path, runs):
    rec = capture("powersgd:rank=1")
    q = torch.randn(rec.public["Q_init"].shape, generator=torch.Generator().manual_seed(5))
    forged = {**rec.public, "Q_init": q}
    _refused(dataclasses.replace(rec, public=forged).save(tmp_path / "q.safetensors"), "Q_init", "at step 0")
    warm = capture("powersgd:rank=1", 2)  # warm start: Q_init is the last Q, any values, but its size is the plan's
    assert load_record(dataclasses.replace(warm, public={**warm.public, "Q_init": forged["Q_init"]})
                       .save(tmp_path / "w.safetensors"))  # fmt: skip
    short = {**warm.public, "Q_init": warm.public["Q_init"][:-1]}
    _refused(dataclasses.replace(warm, public=short).save(tmp_path / "s.safetensors"), "Q_init", "values")
    multi = _load(runs("powersgd:rank=1")[2, 0])
    no_sum = {k: v for k, v in multi.public.items() if k != "P_sum"}
    _refused(dataclasses.replace(multi, public=no_sum).save(tmp_path / "p.safetensors"), "public state", "P_sum")
    mp = capture("mixedprec:bits_per_layer=0-1@4/*@8")
    bits = torch.full_like(mp.public["bits"], 4)
    _refused(dataclasses.replace(mp, public={"bits": bits}).save(tmp_path / "m.safetensors"), "bits")


def test_laq_flag_must_agree_with_the_codes(tmp_path):
    sent = capture("laq:bits=4")
    flag0 = {**sent.messages, "flag": torch.zeros(1, dtype=torch.uint8)}
    _refused(dataclasses.replace(sent, messages=flag0).save(tmp_path / "a.safetensors"), "skipped round", "flag alone")
    flag2 = {**sent.messages, "flag": torch.full((1,), 2, dtype=torch.uint8)}
    _refused(dataclasses.replace(sent, messages=flag2).save(tmp_path / "b.safetensors"), "flag 2")


def test_tq_codes_must_be_of_the_claimed_width(tmp_path, runs):
    rec = capture("tq:bits=8")
    _refused(relabel(rec, tmp_path / "a.safetensors", defense=create(rec.meta.defense, bits=4).spec), "code bytes")
    # two workers: codes padded to the longer worker's, so the padding must be zeros
    multi = _load(runs("tq:bits=8")[0, 0])
    _refused(relabel(multi, tmp_path / "b.safetensors", defense=create(multi.meta.defense, bits=4).spec), "4-bit codes")


def test_a_claim_with_identical_messages_is_accepted(tmp_path):
    # before its first compressed step, PowerSGD sends the plain gradient: the same messages as none
    rec = capture("none")
    claim = create("powersgd:rank=1,start_iter=1").spec
    assert load_record(relabel(rec, tmp_path / "a.safetensors", defense=claim)).meta.defense == claim
    _refused(relabel(rec, tmp_path / "b.safetensors", defense=claim, step=1), "compressed step")


def test_a_flower_client_may_have_taken_fewer_steps_than_the_round(tmp_path):
    # a client sampled for the first time in round 3 sends PowerSGD's warm-up layout there; a capture
    # or training step 2 has had its 2 steps before, so start_iter=1 means factors
    rec = capture("powersgd:rank=1,start_iter=1")
    first = {"source": "federated", "round": 3, "client": 0}
    assert load_record(relabel(rec, tmp_path / "f.safetensors", step=2, extra=first)).meta.step == 2
    _refused(relabel(rec, tmp_path / "c.safetensors", step=2), "a compressed step")
    later = capture("powersgd:rank=1,start_iter=1", 2)  # and it may have been sampled every round
    assert load_record(relabel(later, tmp_path / "l.safetensors", extra={**first, "round": 3}))


# -- relabelling among the families -------------------------------------------------------------------

_KINDS = ("capture step 0", "capture step 2", "2 workers step 2 rank 0", "2 workers step 2 rank 1")


def _masked(messages: dict[str, torch.Tensor]) -> list[tuple]:
    """A layout with what depends on the data left out: any length of these is some gradient's
    (RC-FED's entropy-coded stream, threshold quantization's kept positions and codes)."""
    out = []
    for tag, t in messages.items():
        dtype = str(t.dtype)
        if tag in ("mask", "indices"):
            out.append(("positions",))
        elif tag == "stream" or (tag == "codes" and "count" in messages):
            out.append((tag, dtype))
        else:
            out.append((tag, dtype, tuple(t.shape)))
    return sorted(out, key=str)


@functools.lru_cache(maxsize=None)
def _record(defense: str, kind: str, root: str) -> GradientRecord:
    if kind.startswith("capture"):
        return capture(defense, int(kind[-1]))
    words = kind.split()  # "2 workers step S rank R"
    return _load(_run(defense, 2, root)[int(words[3]), int(words[5])])


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
@given(a=st.integers(0, len(SPECS) - 1), shift=st.integers(1, len(SPECS) - 1), kind=st.sampled_from(_KINDS))
def test_relabelling_among_families_is_refused_unless_the_messages_match(tmp_path_factory, a, shift, kind):
    actual, claimed = SPECS[a], SPECS[(a + shift) % len(SPECS)]
    root = str(tmp_path_factory.getbasetemp() / "relabel-runs")
    rec, ref = _record(actual, kind, root), _record(claimed, kind, root)  # ref: what `claimed` sent in its place
    differs = _masked(rec.messages) != _masked(ref.messages) or set(rec.public) != set(ref.public)
    identical = rec.messages.keys() == ref.messages.keys() and all(
        rec.messages[k].dtype == ref.messages[k].dtype and torch.equal(rec.messages[k], ref.messages[k])
        for k in rec.messages
    )
    path = relabel(rec, tmp_path_factory.mktemp("relabel") / "r.safetensors", defense=create(claimed).spec)
    if differs:
        _refused(path)
        event("layout differs: refused")
    elif identical:
        assert load_record(path).meta.defense == create(claimed).spec
        event("identical messages: accepted")
    else:
        event("same layout, other values: either")  # e.g. none as noise, TQ's threshold


@pytest.mark.slow
def test_every_relabelling_among_families(tmp_path_factory):
    """The hypothesis test's property over all of it: every spec as every other, on every kind of record
    (24 specs x 6 kinds x 23 claims = 3312 relabellings, ~3 min on one core)."""
    root = str(tmp_path_factory.mktemp("every"))
    kinds = (*_KINDS, "2 workers step 0 rank 0", "2 workers step 0 rank 1")
    counts = dict.fromkeys(
        ("refused, layout differs", "accepted, identical", "same layout: refused", "same layout: accepted"), 0
    )
    path = tmp_path_factory.mktemp("every-relabel") / "r.safetensors"
    for kind in kinds:
        for actual in SPECS:
            rec = _record(actual, kind, root)
            for claimed in SPECS:
                if claimed == actual:
                    continue
                ref = _record(claimed, kind, root)
                differs = _masked(rec.messages) != _masked(ref.messages) or set(rec.public) != set(ref.public)
                identical = rec.messages.keys() == ref.messages.keys() and all(
                    rec.messages[k].dtype == ref.messages[k].dtype and torch.equal(rec.messages[k], ref.messages[k])
                    for k in rec.messages
                )
                relabel(rec, path, defense=create(claimed).spec)
                try:
                    load_record(path)
                    refused = False
                except RecordError:
                    refused = True
                assert refused or not differs, (actual, kind, claimed)
                assert not refused or not identical, (actual, kind, claimed)
                key = ("refused, layout differs" if differs else "accepted, identical" if identical
                       else f"same layout: {'refused' if refused else 'accepted'}")  # fmt: skip
                counts[key] += 1
    print(counts)
    assert sum(counts.values()) == len(SPECS) * (len(SPECS) - 1) * len(kinds)
