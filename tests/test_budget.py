"""gia_bench.budget: an attack on a record is refused before it allocates when it cannot fit."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gia_bench.budget import (
    DEFAULT_MAX_MEMORY,
    MAX_LOCAL_EXAMPLES,
    AttackNeeds,
    activation_elements,
    check_attack,
    check_local_work,
    check_study,
    estimate_memory,
    parse_memory,
)
from gia_bench.capture import CaptureConfig, capture
from gia_bench.cli import app
from gia_bench.errors import ConfigError, RecordError, SpecError
from gia_bench.evaluate import AttackOptions, evaluate, run_attacks
from gia_bench.records import GradientRecord, ModelSpec
from gia_bench.receiver import load_record
from gia_bench.study import DEMO_STUDY, load_study, parse_study

REPO = Path(__file__).resolve().parents[1]


def _cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        app(args, prog_name="gia-bench")
    return int(exc.value.code or 0)


def _rewrite(src: Path, dst: Path, **changes) -> Path:
    """``src`` with metadata fields replaced (the model's weights do not depend on them)."""
    record = GradientRecord.load(src)
    meta = dataclasses.replace(record.meta, **changes)
    dataclasses.replace(record, meta=meta, path=None, sha256=None).save(dst)
    return dst


@pytest.fixture(scope="module")
def resnet_4096(tmp_path_factory) -> Path:
    """A valid ResNet-18 record claiming 3 x 4096 x 4096 inputs: ResNet-18's weights do not depend
    on the input size (adaptive pooling), so the 32 px record's weights fit it."""
    root = tmp_path_factory.mktemp("resnet")
    capture(CaptureConfig("digits", "resnet18", "none", 1, 1, 0, root / "small"))
    small = next(p for p in (root / "small").glob("*.safetensors") if ".truth" not in p.name)
    meta = GradientRecord.load(small).meta
    shape = (3, 4096, 4096)
    return _rewrite(small, root / "big.safetensors", model=dataclasses.replace(meta.model, in_shape=shape),
                    dataset=dataclasses.replace(meta.dataset, shape=shape))


@pytest.fixture(scope="module")
def lenet_records(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lenet")
    capture(CaptureConfig("digits", "lenet", "none", 2, 1, 0, root / "fedsgd"))
    capture(CaptureConfig("digits", "lenet", "none", 2, 1, 0, root / "fedavg", local_steps=2, local_batch=1))
    return root


def _one(folder: Path) -> Path:
    return next(p for p in folder.glob("*.safetensors") if ".truth" not in p.name)


# -- the estimate ------------------------------------------------------------------------------


def test_activations_are_counted_exactly():
    # MLP: Flatten (c*h*w) + Linear and ReLU (hidden each) + Linear (classes)
    assert activation_elements(ModelSpec("mlp:hidden=7", (2, 3, 5), 4)) == 30 + 7 + 7 + 4
    # LeNet at 32 px: outputs 12x16x16, 12x8x8, 12x8x8 (conv and sigmoid each) + 10 logits,
    # plus each convolution's im2col columns (in_channels x 5 x 5 per output position)
    outputs = 2 * (12 * 16 * 16 + 12 * 8 * 8 + 12 * 8 * 8) + 10
    columns = 3 * 25 * 16 * 16 + 12 * 25 * 8 * 8 + 12 * 25 * 8 * 8
    assert activation_elements(ModelSpec("lenet", (3, 32, 32), 10)) == outputs + columns


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 64), restarts=st.integers(1, 8), more=st.integers(1, 8))
def test_estimate_grows_with_batch_and_restarts(batch, restarts, more):
    spec = ModelSpec("lenet", (3, 32, 32), 10)
    base = estimate_memory(spec, batch, AttackNeeds(restarts))
    assert estimate_memory(spec, batch + more, AttackNeeds(restarts)).total > base.total
    assert estimate_memory(spec, batch, AttackNeeds(restarts + more)).total > base.total
    # a FedAvg update keeps every simulated step in the graph
    fedavg = estimate_memory(spec, batch, AttackNeeds(restarts), local_steps=1 + more, local_batch=batch)
    assert fedavg.total > base.total


def test_lbfgs_history_counts():
    from gia_bench.attacks import create

    assert AttackNeeds.of(create("dlg")).input_copies > AttackNeeds.of(create("ig")).input_copies
    assert AttackNeeds.of(create("dlg:history_size=10")).input_copies < AttackNeeds.of(create("dlg")).input_copies
    assert AttackNeeds.of(create("ig:restarts=4")).restarts == 4


@pytest.mark.parametrize("text, value", [("4GiB", 4 * 1024**3), ("1500MB", 1_500_000_000), ("3e9", 3_000_000_000),
                                         ("512 MiB", 512 * 1024**2), (1024, 1024)])
def test_parse_memory(text, value):
    assert parse_memory(text) == value


@pytest.mark.parametrize("text", ["abc", "-1GiB", "0", "nan", "inf", "4XB", ""])
def test_parse_memory_refuses(text):
    with pytest.raises(SpecError, match="--max-memory"):
        parse_memory(text)


# -- records refused before anything is allocated ----------------------------------------------


def test_resnet18_at_4096_passes_validation_but_not_the_budget(resnet_4096):
    record = load_record(resnet_4096)  # inside every bound of the record format
    assert record.meta.model.in_shape == (3, 4096, 4096)
    with pytest.raises(RecordError) as exc:
        check_attack(record.meta, AttackNeeds(), where=resnet_4096)
    text = str(exc.value)
    assert str(resnet_4096) in text and "--max-memory 2.0 GiB" in text and "TiB" in text and "\n" not in text
    # the flag raises the bound: the same record is accepted under a (fictional) 1 PiB
    assert check_attack(record.meta, AttackNeeds(), 2**50, resnet_4096).total > DEFAULT_MAX_MEMORY


def test_resnet18_at_4096_is_refused_in_a_process_that_stays_small(resnet_4096, tmp_path):
    """The attack command refuses it and the process's peak memory stays far below the estimate
    (without the check, the first forward at 4096 px would need more than 3 GB)."""
    code = (
        "import sys\n"
        "from gia_bench.cli import app\n"
        "try:\n"
        f"    app(['attack', {str(resnet_4096)!r}, '--attack', 'ig:iterations=1', '--out', {str(tmp_path)!r}],"
        " prog_name='gia-bench')\n"
        "except SystemExit as exc:\n"
        "    peak = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "    print('RESULT', exc.code, peak * 1024)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    rc, peak = int(line.split()[1]), int(line.split()[2])
    assert rc == 2, proc.stderr
    assert "--max-memory" in proc.stderr and "Traceback" not in proc.stderr
    assert peak < 1.5 * 1024**3, f"peak RSS {peak / 2**30:.2f} GiB"
    assert not list(tmp_path.rglob("result.json"))


def test_fedavg_local_steps_10000_refused_at_once(lenet_records, tmp_path):
    small = _one(lenet_records / "fedavg")
    big = _rewrite(small, tmp_path / "steps.safetensors", local_steps=10_000)
    load_record(big)  # the record format allows it (records.MAX_LOCAL_STEPS)
    with pytest.raises(RecordError, match=r"local_steps 10000 x local_batch 1 = 10,000 simulated examples"):
        evaluate(big, "ig:iterations=1", "naive", tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("batch", [512, 4096])
def test_fedavg_large_batch_times_steps_refused(batch):
    with pytest.raises(SpecError, match="simulated examples per update"):
        check_local_work(100, batch, "record")
    # the memory estimate alone also refuses it: every step stays in the graph
    spec = ModelSpec("lenet", (3, 32, 32), 10)
    assert estimate_memory(spec, batch, AttackNeeds(), local_steps=100, local_batch=batch).total > DEFAULT_MAX_MEMORY


@settings(max_examples=50, deadline=None)
@given(steps=st.integers(1, 10_000), local_batch=st.integers(1, 4096))
def test_local_work_bound_is_the_product(steps, local_batch):
    if steps * local_batch > MAX_LOCAL_EXAMPLES:
        with pytest.raises(SpecError):
            check_local_work(steps, local_batch, "x")
    else:
        check_local_work(steps, local_batch, "x")


def test_cli_attack_refuses_with_one_line_and_flag_raises_it(resnet_4096, lenet_records, tmp_path, capsys):
    assert _cli(["attack", str(resnet_4096), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "--max-memory" in err and str(resnet_4096.name) in err and "Traceback" not in err
    assert _cli(["attack", str(_one(lenet_records / "fedsgd")), "--max-memory", "lots", "--out", str(tmp_path)]) == 2
    assert "--max-memory 'lots'" in capsys.readouterr().err
    # positive control: a normal capture is attacked under the default bound
    assert _cli(["attack", str(_one(lenet_records / "fedsgd")), "--attack", "dlg:iterations=1",
                 "--out", str(tmp_path / "ok")]) == 0
    assert len(list((tmp_path / "ok").rglob("result.json"))) == 1


def test_run_attacks_checks_every_record_before_the_first_attack(resnet_4096, lenet_records, tmp_path):
    small = _one(lenet_records / "fedsgd")
    with pytest.raises(RecordError, match="--max-memory"):
        run_attacks([small, resnet_4096], ["dlg:iterations=1"], ["naive"], AttackOptions(out=tmp_path))
    assert not list(tmp_path.rglob("result.json"))  # the small one, listed first, did not run either
    # a tiny bound refuses even a LeNet record; the default accepts it
    with pytest.raises(RecordError, match="--max-memory 1.0 MiB"):
        run_attacks([small], ["dlg:iterations=1"], ["naive"], AttackOptions(out=tmp_path, max_memory=2**20))


# -- studies -------------------------------------------------------------------------------------


def test_demo_study_fits_the_default_bound():
    check_study(load_study(DEMO_STUDY))


def test_study_cell_past_the_bound_is_refused_before_any_unit(tmp_path, capsys):
    raw = {"datasets": ["photos:size=256,grid=2"], "models": ["resnet18"], "batch_sizes": [64],
           "defenses": ["none"], "attacks": ["ig"], "images": 1}
    config = parse_study(raw)
    with pytest.raises(ConfigError, match=r"photos:size=256,grid=2 x resnet18 x batch 64 x ig: .*--max-memory"):
        check_study(config, where="s.toml")
    check_study(config, max_memory=2**50)
    study = tmp_path / "s.toml"
    study.write_text('datasets = ["photos:size=256,grid=2"]\nmodels = ["resnet18"]\nbatch_sizes = [64]\n'
                     'defenses = ["none"]\nattacks = ["ig"]\nimages = 1\n')
    assert _cli(["study", "run", str(study), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--max-memory" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "records").exists()
