"""Study throughput: ``study run --workers 2`` vs ``--workers 1``, and ``--engine ray`` vs ``local``.

Each configuration runs the same study as ``gia-bench study run`` in a fresh process
into a fresh folder (so interpreter start, imports, pool start-up and captures are all
in the time, as a user pays them). Configurations are interleaved (A, B, A, B, ...) so a
change in the machine's load hits all of them alike, and the ratios are medians of
times measured in this one run. Two studies:

* ``large``: >= 16 attack units (``--images`` records x 2 defenses x 2 views) of an
  Inverting Gradients attack long enough to take >= 5 s each (``--attack``);
* ``small``: 4 attacks of 2 DLG iterations each (start-up dominates).

    PYTHONPATH=. .venv/bin/python benchmarks/study.py [--repeats 1] [--ray] [--only small|large] [--baseline DIR]

``--baseline DIR`` also runs another checkout's ``--workers 1`` and ``--workers 2`` in the
same interleaved rounds (keys ``base_workers_1``/``base_workers_2``): a change compared with
the code before it under the same load.

prints one JSON object on stdout: seconds per run, the measured seconds per attack unit
(from the results), the ratios, the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STUDY = """
name = "{name}"
datasets = ["digits"]
models = ["lenet"]
images = {images}
defenses = ["none", "topk:ratio=0.1"]
attacks = ["{attack}"]
views = {views}
"""


def run(study: Path, out: Path, args: list[str], repo: Path = Path(__file__).parents[1]) -> float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "gia_bench", "study", "run", str(study), "--out", str(out), *args],
        capture_output=True, text=True, env=env,
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"study run {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return seconds


def unit_seconds(out: Path) -> list[float]:
    return [json.loads(p.read_text())["seconds"] for p in out.glob("runs/**/result.json")]


def bench(name: str, text: str, configs: dict[str, tuple[list[str], Path]], repeats: int, tmp: Path) -> dict:
    study = tmp / f"{name}.toml"
    study.write_text(text)
    times: dict[str, list[float]] = {k: [] for k in configs}
    units: dict[str, list[float]] = {k: [] for k in configs}
    for rep in range(repeats):
        order = list(configs) if rep % 2 == 0 else list(reversed(configs))
        for key in order:
            out = tmp / f"{name}-{key}-{rep}"
            times[key].append(run(study, out, *configs[key]))
            units[key] += unit_seconds(out)
            shutil.rmtree(out)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "attack_units": len(units[next(iter(configs))]) // repeats,
        "seconds": times,
        "median_seconds": med,
        "unit_seconds_mean": {k: statistics.fmean(v) for k, v in units.items() if v},
        "unit_seconds_min": {k: min(v) for k, v in units.items() if v},
        "speedup_vs_workers_1": {k: med["workers_1"] / med[k] for k in configs if k != "workers_1"},
        **({"base_speedup_workers_2_vs_1": med["base_workers_1"] / med["base_workers_2"]} if "base_workers_2" in med else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--images", type=int, default=4, help="records per defense (large study: x2 defenses x2 views)")
    parser.add_argument("--attack", default="ig:iterations=1500,lr=0.1,tv=0.01")
    parser.add_argument("--ray", action="store_true", help="also --engine ray (a local Ray with this machine's CPUs)")
    parser.add_argument("--only", choices=("large", "small"), default=None)
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another checkout (e.g. /work/main): also run its --workers 1/2 (keys base_workers_1/2), interleaved")
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1]
    configs = {"workers_1": (["--workers", "1"], here), "workers_2": (["--workers", "2"], here)}
    if args.ray:
        configs["ray"] = (["--engine", "ray"], here)
    if args.baseline is not None:
        for w in ("1", "2"):
            configs[f"base_workers_{w}"] = (["--workers", w], args.baseline.resolve())
    tmp = Path(tempfile.mkdtemp(prefix="gia-bench-study-bench-"))
    report: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg_before": os.getloadavg()},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    try:
        if args.only in (None, "small"):
            small = STUDY.format(name="small", images=1, attack="dlg:iterations=2", views='["naive", "aware"]')
            report["small"] = bench("small", small, configs, args.repeats, tmp)
        if args.only in (None, "large"):
            large = STUDY.format(name="large", images=args.images, attack=args.attack, views='["naive", "aware"]')
            report["large"] = bench("large", large, configs, args.repeats, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["machine"]["load_avg_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
