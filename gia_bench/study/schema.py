"""A study file's schema: the TOML keys, their checks, and the parsed :class:`StudyConfig`.

The ``[train]`` table is a set of overrides of :class:`~gia_bench.train.TrainConfig`
(any of its fields the study does not set itself; omitted keys take the trainer's own
defaults), plus the few keys only a study has (:data:`STUDY_TRAIN_KEYS`). Everything is
checked before anything runs: an unknown key, a value of the wrong type or a spec that
does not resolve raises :class:`ConfigError` naming the key and what is accepted.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gia_bench.errors import ConfigError, GiaBenchError
from gia_bench.io import slug as io_slug

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if typing.TYPE_CHECKING:
    from gia_bench.train import TrainConfig

#: Views a study runs when it names none (``oracle``, an upper bound, only when asked for).
DEFAULT_VIEWS = ("naive", "aware")
#: The built-in studies (``gia-bench study run NAME``) and the one ``gia-bench demo`` runs.
STUDIES_DIR = Path(__file__).resolve().parent.parent / "studies"
DEMO_STUDY = STUDIES_DIR / "demo.toml"
#: Records per capture cell (``images``) and units of work per study (captures, attacks,
#: trainings, attacks on trainings): a grid past them is refused before anything is planned.
#: Planning costs ~1 ms per unit (20,000 in 22 s on 2 busy cores), running one a process
#: start or more; the demo has 183.
MAX_IMAGES = 1000
MAX_UNITS = 20_000

TOP_KEYS: dict[str, str] = {
    "name": "string",
    "datasets": "list of dataset specs",
    "models": "list of model specs",
    "defenses": "list of defense specs",
    "attacks": "list of attack specs",
    "attack_models": "table: an attack of `attacks` -> the `models` whose records it attacks (default: all)",
    "views": "list of 'naive' / 'aware' / 'oracle'",
    "batch_sizes": "list of positive integers",
    "images": "positive integer",
    "seeds": "list of integers",
    "model_mode": "'train' or 'eval'",
    "fewbit_backward": "integer 0 (exact backward) or 1..8 bits",
    "data_root": "folder of torchvision data sets (as --data-root), for captures and [train]",
    "train": "table",
}
REQUIRED = ("datasets", "models", "defenses", "attacks")
#: ``[train]`` keys that are the study's, not the trainer's.
STUDY_TRAIN_KEYS = ("defenses", "seeds", "attack_steps", "attacks", "attack_defenses")
#: TrainConfig fields a study sets itself: the folder, the defense, the steps it attacks
#: (``attack_steps``), resuming, and the device (``--device``).
_STUDY_SET = ("out", "defense", "capture_steps", "resume", "backend", "device")


@dataclasses.dataclass(frozen=True)
class StudyTrain:
    """``[train]``: one training run per defense (and seed), the accuracy and wire-bytes columns.

    ``overrides`` are the table's :class:`~gia_bench.train.TrainConfig` fields as written
    (sorted by name); every other field keeps the trainer's default (``lr`` omitted: 0.1 x
    global batch / 256). The study's own keys: ``defenses`` (default: the study's),
    ``seeds`` (several runs per defense, for standard errors; default: the one ``seed``),
    ``attack_steps`` (optimizer steps, 0-based, ``"end"`` the last, at which rank 0's
    messages are saved as records for the study's attacks and views), ``attacks``
    (default: the study's) and ``attack_defenses`` (default: every trained defense).
    """

    overrides: tuple[tuple[str, Any], ...] = ()
    defenses: tuple[str, ...] | None = None
    seeds: tuple[int, ...] | None = None
    attack_steps: tuple[int | str, ...] = ()
    attacks: tuple[str, ...] | None = None
    attack_defenses: tuple[str, ...] | None = None

    @property
    def base(self) -> TrainConfig:
        """The TrainConfig every run starts from (defense ``none``, folder ``.``)."""
        from gia_bench.train import TrainConfig

        return TrainConfig(out=Path("."), **dict(self.overrides))

    @property
    def run_seeds(self) -> tuple[int, ...]:
        return self.seeds if self.seeds is not None else (self.base.seed,)


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """A parsed, validated study file."""

    name: str
    datasets: tuple[str, ...]
    models: tuple[str, ...]
    defenses: tuple[str, ...]
    attacks: tuple[str, ...]
    views: tuple[str, ...] = DEFAULT_VIEWS
    batch_sizes: tuple[int, ...] = (1,)
    images: int = 4
    seeds: tuple[int, ...] = (0,)
    model_mode: str = "train"
    fewbit_backward: int = 0  # bits of Few-Bit Backward activations in the captures (0: exact)
    data_root: Path | None = None  # torchvision data sets (cifar10...): captures, and [train] unless it sets its own
    train: StudyTrain | None = None
    #: ``(attack, models)`` pairs: that attack runs on those models' records only (others: every model)
    attack_models: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def attacks_for(self, model: str) -> tuple[str, ...]:
        """The attacks that run on the records of ``model`` (as written in ``models``)."""
        only = dict(self.attack_models)
        return tuple(a for a in self.attacks if a not in only or model in only[a])


def attack_models(where: Path | str, value: Any, attacks: tuple[str, ...], models: tuple[str, ...]
                  ) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``attack_models = {"tag:iterations=50" = ["minilm"]}``: keys from ``attacks``, values from ``models``."""
    if not isinstance(value, dict) or not value:
        raise fail(where, "attack_models", f"expected a table of attack -> list of models, got {value!r}")
    out = []
    for attack, chosen in value.items():
        if attack not in attacks:
            raise fail(where, f"attack_models.{attack}", f"is not one of attacks: {', '.join(attacks)}")
        chosen = str_list(where, f"attack_models.{attack}", chosen)
        unknown = [m for m in chosen if m not in models]
        if unknown:
            raise fail(where, f"attack_models.{attack}", f"{unknown} not in models: {', '.join(models)}")
        out.append((attack, chosen))
    return tuple(out)


def slug(spec: str) -> str:
    """A readable, filesystem-safe name for a spec string (``topk:ratio=0.01`` -> ``topk_ratio-0.01``)."""
    text = spec.replace(":", "_", 1).replace(":", "_").replace(",", "_").replace("=", "-")
    return io_slug(text, runs=False)


def fail(where: Path | str, key: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: key '{key}': {message}")


def str_list(where: Path | str, key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise fail(where, key, f"expected a non-empty {TOP_KEYS.get(key, 'list of strings')}, got {value!r}")
    if len(set(value)) != len(value):
        raise fail(where, key, f"has duplicates: {value!r}")
    return tuple(v.strip() for v in value)


def int_list(where: Path | str, key: str, value: Any, positive: bool) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    ok = isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok or (positive and min(value) < 1):
        kind = "positive integers" if positive else "integers"
        raise fail(where, key, f"expected a non-empty list of {kind}, got {value!r}")
    if len(set(value)) != len(value):
        raise fail(where, key, f"has duplicates: {value!r}")
    return tuple(value)


def fewbit(where: Path | str, key: str, value: Any) -> int:
    """Bits of Few-Bit Backward (gia_bench.fewbit): 0 (exact) or 1..8, as ``--fewbit-backward``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 8:
        raise fail(where, key, f"expected an integer 0 (exact backward) or 1..8 bits, got {value!r}")
    return value


def _attack_steps(where: Path | str, value: Any) -> tuple[int | str, ...]:
    """``[0, 50, "end"]``: distinct optimizer steps >= 0, or ``"end"`` (the run's last step)."""
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        value = [value]
    ok = isinstance(value, list) and all(
        (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or v == "end" for v in value
    )
    if not ok or len(set(value)) != len(value):
        raise fail(where, "train.attack_steps", f'expected distinct optimizer steps >= 0 or "end", got {value!r}')
    return tuple(value)


def _typed(where: Path | str, key: str, hint: Any, value: Any) -> Any:
    """``value`` as TrainConfig field ``key`` of type ``hint`` takes it, or a ConfigError naming ``train.key``.

    TOML has no None: an optional field is set by giving a value, left to its default by omitting it.
    """
    where_key = f"train.{key}"
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _typed(where, key, args[0], value)
    if origin is typing.Literal:
        if value not in args:
            raise fail(where, where_key, f"expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:  # tuple[int, ...]: capture_ranks
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise fail(where, where_key, f"expected a list of integers, got {value!r}")
        return tuple(value)
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise fail(where, where_key, f"expected a path (a string), got {value!r}")
        return Path(value).expanduser()
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # TOML's 0 for a float field
    if isinstance(value, bool) != (hint is bool) or not isinstance(value, hint):
        raise fail(where, where_key, f"expected {hint.__name__}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise fail(where, where_key, f"expected a finite number, got {value!r}")
    return value


def _train_value(where: Path | str, key: str, value: Any, hints: Mapping[str, Any]) -> Any:
    if key in ("defenses", "attacks", "attack_defenses"):
        return str_list(where, f"train.{key}", value)
    if key == "seeds":
        return int_list(where, "train.seeds", value, positive=False)
    if key == "attack_steps":
        return _attack_steps(where, value)
    if key == "fewbit_backward":
        return fewbit(where, "train.fewbit_backward", value)
    if key == "lr" and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf):
        raise fail(where, "train.lr", f"expected a finite number > 0 (omit it for 0.1 x global batch / 256),"
                    f" got {value!r}")
    return _typed(where, key, hints[key], value)


def parse_train(where: Path | str, raw: Any) -> StudyTrain:
    """The ``[train]`` table: TrainConfig overrides (typed as its fields) and the study's own keys."""
    from gia_bench.train import TrainConfig

    if not isinstance(raw, dict):
        raise fail(where, "train", f"expected a table, got {raw!r}")
    hints = typing.get_type_hints(TrainConfig)
    accepted = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in _STUDY_SET] + list(STUDY_TRAIN_KEYS)
    own: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in accepted:
            set_here = " (the study sets it)" if key in _STUDY_SET else ""
            raise fail(where, f"train.{key}", f"unknown key{set_here}; accepted: {', '.join(accepted)}")
        (own if key in STUDY_TRAIN_KEYS else overrides)[key] = _train_value(where, key, value, hints)
    if "seed" in overrides and "seeds" in own:
        raise fail(where, "train.seeds", "give either seed or seeds, not both")
    for key in ("epochs", "batch_size", "nproc_per_node"):
        if key in overrides and overrides[key] < 1:
            raise fail(where, f"train.{key}", f"must be >= 1, got {overrides[key]}")
    return StudyTrain(overrides=tuple(sorted(overrides.items())), **own)


def _resolve(path: Path) -> Path:
    """A study file's path, or a built-in study's name (``demo``, ``lqsgd-paper.toml``) when no such file exists."""
    if path.exists() or path.parent != Path("."):
        return path
    builtin = STUDIES_DIR / (path.name if path.suffix == ".toml" else f"{path.name}.toml")
    return builtin if builtin.is_file() else path


def builtin_studies() -> tuple[str, ...]:
    """The names ``gia-bench study run`` accepts besides a file path."""
    return tuple(sorted(p.stem for p in STUDIES_DIR.glob("*.toml")))


def resolve_study(source: Path | str) -> Path:
    """``source`` as a path to read: the file itself, else the built-in study of that name."""
    return _resolve(Path(source))


def load_study(path: Path | str) -> StudyConfig:
    """Read and validate a study TOML file (a path, or a built-in study's name)."""
    from gia_bench.study.parse import parse_study

    path = resolve_study(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        names = ", ".join(builtin_studies())
        raise ConfigError(f"{path}: no such study file (built-in studies: {names})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return parse_study(raw, path)


def check_specs(where: Path | str, key: str, specs: tuple[str, ...], registry: Any, instantiate: bool) -> None:
    """Every spec resolves in ``registry`` (built when ``instantiate``), else a ConfigError naming ``key``."""
    for spec in specs:
        try:
            if instantiate:
                registry.create(spec)
            else:
                registry.kwargs_for(spec)
        except GiaBenchError as exc:
            raise fail(where, key, f"{spec!r}: {exc}") from None


