"""The threat line of a result: what the attacker used, and what a structure-aware attack exploited.

``threat`` in ``result.json`` is the attack's own account (weights, labels, view, public
state). The structure-aware attacks (``feature``, ``analytic``) also say in ``extra``
which layers or rows of the messages they found exact and used; that is what makes a
compressed setting leak under them, so the report prints it. ``extra`` is read as data
(plain JSON values): lists of objects are summarised by their ``layer`` / ``name`` and
the counts they carry, never evaluated.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: attacks that read the compressor's structure (the exact layers or rows it sends) instead of matching gradients
STRUCTURE_AWARE = frozenset({"feature", "analytic"})


def is_structure_aware(attack: str) -> bool:
    return attack.split(":", 1)[0] in STRUCTURE_AWARE


def threat_text(threat: Mapping[str, Any]) -> str:
    """A one-line description of what the attacker used (an empty list reads "none")."""
    parts = []
    for k, v in threat.items():
        if isinstance(v, bool):
            parts.append(f"{k}" if v else f"no {k}")
        elif isinstance(v, (list, tuple)):
            parts.append(f"{k}: {', '.join(map(str, v)) if v else 'none'}")
        elif v is None or v == "":
            parts.append(f"{k}: none")
        else:
            parts.append(f"{k}: {v}")
    return "; ".join(parts)


def read_extra(result: object) -> dict[str, Any]:
    """The result's ``extra`` object: the attribute when the loader kept it, else read from its ``result.json``."""
    extra = getattr(result, "extra", None)
    if extra is None:
        path = getattr(result, "path", None)
        try:
            extra = json.loads(Path(path).read_text(encoding="utf-8")).get("extra") if path else None
        except (OSError, ValueError, AttributeError):
            extra = None
    return extra if isinstance(extra, dict) else {}


def _num(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{100 * v:.2g} %" if 1e-4 <= abs(v) < 1 else f"{v:.2g}"
    return str(v)


def _layer(item: Mapping[str, Any]) -> str:
    """One layer entry as "fc (768 of 768 features, bias ratio)"."""
    name = str(item.get("layer", item.get("name", "?")))
    facts = []
    if isinstance(item.get("known"), int) and isinstance(item.get("features"), int):
        facts.append(f"{item['known']} of {item['features']} features")
    elif isinstance(item.get("known_entries"), int):
        facts.append(f"{item['known_entries']} entries")
    if isinstance(item.get("method"), str):
        facts.append(item["method"])
    return name + (f" ({', '.join(facts)})" if facts else "")


def exploited_text(extra: Mapping[str, Any]) -> str:
    """What a structure-aware attack says it used: layers, rows, method, its own error estimate ("" when nothing)."""
    parts = []
    layers = extra.get("layers_used")
    if isinstance(layers, list) and layers:
        parts.append("exact layers: " + ", ".join(_layer(x) if isinstance(x, dict) else str(x) for x in layers))
    if isinstance(extra.get("layer"), str):
        rows = extra.get("rows_used")
        total = extra.get("rows")
        where = f"layer {extra['layer']}"
        if isinstance(rows, int):
            where += f": {rows}" + (f" of {total}" if isinstance(total, int) else "") + " exact rows"
        parts.append(where)
    chain = extra.get("layers")
    if isinstance(chain, list) and chain and all(isinstance(x, str) for x in chain):
        parts.append("solved down " + " > ".join(chain))
    if isinstance(extra.get("method"), str) and not layers:
        parts.append(extra["method"])
    if isinstance(extra.get("pixels_known"), int):
        parts.append(f"{extra['pixels_known']} pixels known")
    est = extra.get("feature_error_estimate")
    if isinstance(est, (int, float)) and not isinstance(est, bool):
        parts.append(f"feature error (its own estimate) {_num(float(est))}")
    return "; ".join(parts)
