"""How the report names a defense: the study's own spelling, else every parameter that tells settings apart.

Records carry the compressor's canonical spec (every parameter, defaults included:
``topk:ratio=0.01,error_feedback=true``). Shown whole, a table drowns in defaults;
shown without its defaults, ``topk`` stands beside ``topk:ratio=0.1`` and the reader
has to know the default ratio. So, in order:

1. **The study's spelling.** A study folder pins the study it ran (``study.toml``);
   its ``defenses`` (and its training section's) are what the user wrote. A spelling
   names a canonical spec when their names agree and each parameter it gives has the
   canonical value; the spelling that gives the most parameters wins, and a spelling
   that would name two different settings of this report names neither.
2. **Otherwise** the spec with its non-default parameters, plus every parameter whose
   value differs between settings of the same compressor in this report: both Top-k
   rows then read ``topk:ratio=0.1`` and ``topk:ratio=0.01``.

Parsing here is textual (``name:k=v,...``); the study file is read with :mod:`tomllib`
and never executed.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

STUDY_FILE = "study.toml"


def split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``name:k=v,...`` as (name, {k: v}) without the registry (values stay text)."""
    name, _, rest = spec.partition(":")
    params: dict[str, str] = {}
    for item in rest.split(",") if rest else ():
        key, sep, value = item.partition("=")
        if sep:
            params[key.strip()] = value.strip()
    return name.strip(), params


def _same_value(a: str, b: str) -> bool:
    """Spec values as the registry would compare them: numbers by value, booleans by case."""
    if a.lower() == b.lower():
        return True
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    except ValueError:
        return False


def _names(canonical: str, spelling: str) -> int | None:
    """How many parameters ``spelling`` gives when it names ``canonical``; None when it does not."""
    name, params = split_spec(spelling)
    cname, cparams = split_spec(canonical)
    if name != cname or any(k not in cparams or not _same_value(v, cparams[k]) for k, v in params.items()):
        return None
    return len(params)


def study_spellings(paths: Iterable[Path]) -> tuple[str, ...]:
    """The defense specs of the ``study.toml`` pinned beside the given run folders (empty when there is none)."""
    out: list[str] = []
    for path in paths:
        for folder in (Path(path), Path(path).parent):
            study = folder / STUDY_FILE
            try:
                data = tomllib.loads(study.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
                continue
            train = data.get("train") if isinstance(data.get("train"), dict) else {}
            for value in (data.get("defenses"), train.get("defenses"), train.get("attack_defenses")):
                if isinstance(value, list):
                    out += [v for v in value if isinstance(v, str) and v not in out]
            break
    return tuple(out)


def _by_spelling(specs: Sequence[str], spellings: Sequence[str]) -> dict[str, str]:
    chosen: dict[str, str] = {}
    for spec in specs:
        scored = [(n, s) for s in spellings if (n := _names(spec, s)) is not None]
        if scored:
            best = max(n for n, _ in scored)
            tied = [s for n, s in scored if n == best]
            if len(tied) == 1:
                chosen[spec] = tied[0]
    # a spelling that names two settings of this report is ambiguous: it names neither
    count: dict[str, int] = defaultdict(int)
    for s in chosen.values():
        count[s] += 1
    return {spec: s for spec, s in chosen.items() if count[s] == 1}


def _distinguishing(specs: Sequence[str], short: Mapping[str, str]) -> dict[str, str]:
    """Each spec with its non-default parameters and those that differ within its compressor family."""
    family: dict[str, list[dict[str, str]]] = defaultdict(list)
    for spec in specs:
        name, params = split_spec(spec)
        family[name].append(params)
    out = {}
    for spec in specs:
        name, params = split_spec(spec)
        keep = set(split_spec(short.get(spec, spec))[1])
        for k, v in params.items():
            if any(k not in other or not _same_value(v, other[k]) for other in family[name]):
                keep.add(k)
        shown = [f"{k}={v}" for k, v in params.items() if k in keep]
        out[spec] = name + (":" + ",".join(shown) if shown else "")
    return out


def display_names(specs: Iterable[str], spellings: Sequence[str] = (), short: Mapping[str, str] | None = None) -> dict[str, str]:
    """Canonical defense spec -> the name the report shows (rules in the module docstring).

    ``short`` maps a spec to its form without default parameters (the registry's view,
    :func:`gia_bench.reports.tables.short_spec`); without it only differing parameters are kept.
    Two specs never get the same name: on a clash both are shown in full.
    """
    specs = list(dict.fromkeys(specs))
    names = _distinguishing(specs, short or {})
    names.update(_by_spelling(specs, spellings))
    seen: dict[str, list[str]] = defaultdict(list)
    for spec, shown in names.items():
        seen[shown].append(spec)
    for shown, owners in seen.items():
        if len(owners) > 1:
            for spec in owners:
                names[spec] = spec
    return names


def full_spec(spec: str) -> str:
    """A canonical spec as the report prints it in full: every parameter except those left unset (``=None``)."""
    name, params = split_spec(spec)
    kept = [f"{k}={v}" for k, v in params.items() if v != "None"]
    return name + (":" + ",".join(kept) if kept else "")
