"""``--engine ray`` on a local 2-CPU Ray: same files and summary as the local engine, resumable, cancellable."""

import csv
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from gia_bench import study as study_mod
from gia_bench.engines import EngineError
from gia_bench.study import StudyOptions, prepare, run_study, status

TINY = """
name = "tiny"
datasets = ["digits"]
models = ["lenet"]
images = 1
defenses = ["none", "topk:ratio=0.05"]
attacks = ["dlg:iterations=2"]
views = ["naive", "aware"]
"""
TIMING = {"seconds"}  # wall time differs between any two runs; everything else must match


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    temp = tempfile.mkdtemp(prefix="gbray", dir="/tmp")  # short: Ray's socket paths have a length limit
    for attempt in range(2):
        try:
            ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False, logging_level="ERROR")
            break
        except Exception as exc:  # Ray's node must come up within a fixed 30 s; not our code under test
            ray.shutdown()
            if attempt == 1:
                pytest.skip(f"a local Ray did not start on this (overloaded?) machine: {str(exc).splitlines()[0]}")
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def _summary(out: Path) -> list[dict[str, str]]:
    rows = list(csv.DictReader(io.StringIO((out / "report" / "summary.csv").read_text())))
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _study(tmp_path: Path, name: str) -> tuple[object, Path]:
    src = tmp_path / "tiny.toml"
    src.write_text(TINY)
    out = tmp_path / name
    return prepare(src, out), out


def test_ray_and_local_give_the_same_summary(tmp_path, ray_local):
    config, local = _study(tmp_path, "local")
    run_study(config, local, StudyOptions(workers=2))
    config, remote = _study(tmp_path, "ray")
    st = run_study(config, remote, StudyOptions(engine="ray"))
    assert st.failures == () and st.attacks == (4, 4) and dict(st.ran) == {"capture": 2, "attack": 4}
    assert _summary(remote) == _summary(local) and len(_summary(local)) == 4
    # files came back through the object store; paths inside them name the study folder
    records = sorted(p.relative_to(remote) for p in remote.glob("records/**/*.safetensors"))
    assert records == sorted(p.relative_to(local) for p in local.glob("records/**/*.safetensors"))
    for path in records:
        assert (remote / path).read_bytes() == (local / path).read_bytes()
    result = next(remote.glob("runs/**/result.json")).read_text()
    assert str(remote / "records") in result and "gia-bench-unit-" not in result


def test_an_interrupted_ray_study_resumes_without_redoing_finished_units(tmp_path, ray_local, monkeypatch):
    from gia_bench.engines import progress

    config, out = _study(tmp_path, "out")
    real = progress.Reporter.finished
    seen = []

    def interrupt_after_first_attack(self, unit, outcome, how="ran"):
        real(self, unit, outcome, how)
        seen.append(unit.kind)
        if unit.kind == "attack":
            raise KeyboardInterrupt  # as a Ctrl-C would, with other tasks in flight

    monkeypatch.setattr(progress.Reporter, "finished", interrupt_after_first_attack)
    with pytest.raises(KeyboardInterrupt):
        run_study(config, out, StudyOptions(engine="ray", report=False))
    monkeypatch.setattr(progress.Reporter, "finished", real)
    finished = status(out, config).attacks[0]
    assert 1 <= finished < 4
    assert not list(out.rglob("*.tmp")) and not (out / ".staging").exists() or not any((out / ".staging").iterdir())
    for folder in out.glob("runs/*/*/*/*"):
        assert (folder / "result.json").exists(), f"{folder}: partial result"
    st = run_study(config, out, StudyOptions(engine="ray", report=False))
    assert st.attacks == (4, 4) and dict(st.ran) == {"attack": 4 - finished}


def test_missing_ray_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    config, out = _study(tmp_path, "out")
    with pytest.raises(EngineError, match=r"pip install 'gia-bench\[ray\]'"):
        run_study(config, out, StudyOptions(engine="ray"))
    assert not (out / "records").exists()  # nothing ran
    code = (
        "import sys; sys.modules['ray'] = None; from gia_bench.cli import app;"
        f" sys.argv = ['gia-bench', 'study', 'run', {str(tmp_path / 'tiny.toml')!r}, '--out', {str(out)!r},"
        " '--engine', 'ray']; app()"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == ["error: --engine ray: Ray is not installed; pip install 'gia-bench[ray]'"]


def test_unit_resources_follow_the_study():
    config = study_mod.load_study(study_mod.DEMO_STUDY)
    units = study_mod.plan_units(config, Path("demo"), StudyOptions(device="cuda"))
    by_kind = {u.kind: u for u in units}
    assert by_kind["attack"].gpus == 1 and by_kind["train"].gpus == config.train.base.nproc_per_node
    cpu = {u.kind: u for u in study_mod.plan_units(config, Path("demo"))}
    assert cpu["attack"].gpus == 0 and cpu["train"].cpus == config.train.base.nproc_per_node
    assert all(u.deps for u in units if u.kind == "attack")


@pytest.mark.slow  # the default run stays under 15 min on 2 cores; run with -m slow
def test_a_training_run_study_with_attack_steps_runs_on_ray(tmp_path, ray_local):
    """[train] attack_steps on Ray: the training unit's step records come back through the object
    store, the attack units that depend on them run, and the summary equals the local engine's."""
    import runpy

    STEPS = runpy.run_path(str(Path(__file__).parents[1] / "test_study_train.py"))["STUDY"]

    summaries = []
    for engine in ("local", "ray"):
        (tmp_path / "s.toml").write_text(STEPS)
        out = tmp_path / engine
        config = prepare(tmp_path / "s.toml", out)
        st = run_study(config, out, StudyOptions(engine=engine, workers=1))
        assert st.failures == () and st.trains == (1, 1) and st.attacks == (6, 6)
        steps = sorted(p.name for p in (out / "train" / "topk_ratio-0.2" / "records").glob("step*[0-9].safetensors"))
        assert steps == ["step0000000.safetensors", "step0000005.safetensors"]
        # the one path in the summary (the training run a row came from) names the study folder
        summaries.append([{**r, "train_run": r["train_run"].replace(str(out), "OUT")} for r in _summary(out)])
    assert summaries[0] == summaries[1] and len(summaries[0]) == 6
    assert {r["train_run"] for r in summaries[0]} == {"", "OUT/train/topk_ratio-0.2/metrics.json"}
