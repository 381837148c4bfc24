"""Benchmark: ``gia-bench attack`` at its default threads vs ``OMP_NUM_THREADS=1``. Prints JSON.

It captures one record (``capture --dataset digits --model lenet --defense none --num 1``),
then times ``gia-bench attack`` on it as a subprocess, the settings interleaved per repeat:

- ``default``: no thread setting (the policy of :mod:`gia_bench.threads` chooses);
- ``omp1``: ``OMP_NUM_THREADS=1``;
- ``all_cores``: ``OMP_NUM_THREADS=<cores>``, torch's own default, i.e. what the CLI did
  before the policy (before/after on the same machine).

``--load N`` runs N CPU-burning processes for the whole timing (each ends itself after
``--load-limit`` seconds even if this script is killed; they are killed at the end). Each
run reports its wall time (what a user waits, interpreter start included) and the attack's
own seconds from its ``result.json``; the summary gives medians and ``default / omp1``.

    .venv/bin/python benchmarks/threads.py --attack dlg:iterations=30 --repeats 3
    .venv/bin/python benchmarks/threads.py --attack dlg:iterations=30 --repeats 3 --load 4

Target (issue 29): ``default / omp1 <= 1.2`` at load >= 4 on 2 cores, and ``default`` no
slower than ``all_cores`` on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gia_bench.threads import available_cores, busy_cores, choose_threads

_BURN = "import time\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end:\n    pass\n"


def _cli(*args: str, env: dict[str, str]) -> float:
    """Run ``gia-bench ARGS`` as a subprocess; its wall seconds (raises with its stderr when it fails)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "gia_bench", *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"gia-bench {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return seconds


def _env(threads: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _attack_seconds(out: Path) -> float | None:
    results = list(out.rglob("result.json"))
    return json.loads(results[0].read_text()).get("seconds") if len(results) == 1 else None


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attack", default="dlg:iterations=30", help="attack spec (small: each run is timed)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting, interleaved")
    parser.add_argument("--load", type=int, default=0, help="CPU-burning background processes during the timing")
    parser.add_argument("--load-limit", type=float, default=900.0, help="seconds after which each burner ends itself")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds between starting the burners and the first run")
    parser.add_argument("--no-all-cores", action="store_true", help="skip the OMP_NUM_THREADS=<cores> runs")
    args = parser.parse_args(argv)
    cores = available_cores()
    settings: dict[str, int | None] = {"default": None, "omp1": 1}
    if not args.no_all_cores:
        settings["all_cores"] = cores
    burners: list[subprocess.Popen] = []
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        records = root / "records"
        capture_s = _cli("capture", "--dataset", "digits", "--model", "lenet", "--defense", "none", "--num", "1",
                         "--out", str(records), env=_env(1))
        load_before = _loadavg()
        try:
            for _ in range(args.load):
                burners.append(subprocess.Popen([sys.executable, "-c", _BURN.format(limit=args.load_limit)]))
            if burners:
                time.sleep(args.settle)
            chosen = choose_threads(ceiling=cores, environ={})
            busy = busy_cores()
            for r in range(args.repeats):
                for name, threads in settings.items():
                    out = root / f"runs-{name}-{r}"
                    wall = _cli("attack", str(records), "--attack", args.attack, "--out", str(out), env=_env(threads))
                    runs.append({"setting": name, "repeat": r, "wall_s": round(wall, 2),
                                 "attack_s": _round(_attack_seconds(out)), "loadavg": _loadavg()})
        finally:
            for b in burners:
                b.kill()
            for b in burners:
                b.wait()
    summary: dict[str, float] = {}
    for name in settings:
        mine = [r for r in runs if r["setting"] == name]
        summary[f"{name}_wall_median_s"] = round(statistics.median(r["wall_s"] for r in mine), 2)
        attack = [r["attack_s"] for r in mine if r["attack_s"] is not None]
        if attack:
            summary[f"{name}_attack_median_s"] = round(statistics.median(attack), 2)
    summary["default_over_omp1_wall"] = round(summary["default_wall_median_s"] / summary["omp1_wall_median_s"], 3)
    if "default_attack_median_s" in summary and "omp1_attack_median_s" in summary:
        summary["default_over_omp1_attack"] = round(
            summary["default_attack_median_s"] / summary["omp1_attack_median_s"], 3
        )
    result = {
        "machine": {"cores": cores, "loadavg_before": load_before, "loadavg_after": _loadavg(),
                    "busy_cores_seen": round(busy, 2), "default_threads_chosen": chosen},
        "attack": args.attack,
        "load_processes": args.load,
        "capture_s": round(capture_s, 2),
        "runs": runs,
        "summary": summary,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
