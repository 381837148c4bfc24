"""Name -> class registries and ``name:key=value,...`` spec strings.

A registry is filled by the ``@REGISTRY.register("name")`` decorator where a class
is defined (as in timm / torchvision) and by the entry-point group given to the
registry (installed third-party packages).

Trust: a ``module:Class`` spec imports code, so it resolves only when the user
trusted that class explicitly: ``--plugin module:Class`` on the command line (or
:func:`trusted` in Python; ``gia-bench audit module:Class`` trusts the class it
audits). A spec read from a file (a record's defense or model, a study's lists, a
result's attack) never imports a module that was not trusted, and a trusted class
must subclass the registry's base (``Compressor``, ``nn.Module``, ``Attack``, ...),
checked before anything calls it. Child processes inherit the trusted set through
the ``GIA_BENCH_PLUGINS`` environment variable (comma-separated ``module:Class``).

A spec string parses to exactly the constructor's keyword arguments::

    lqsgd:rank=2,bits=8,alpha=10   ->  LQSGD(rank=2, bits=8, alpha=10.0)
    mypkg.comp:MyCompressor:k=3     ->  mypkg.comp.MyCompressor(k=3)

Values are converted with the constructor's type hints (int, float, bool, str and
``X | None``); an unknown name or key, or a value of the wrong type, raises
:class:`~gia_bench.errors.SpecError` listing what is accepted. A numeric parameter
declares its range in its hint, ``size: Annotated[int, Range(8, 128)] = 32``; a value
outside it (or NaN) is refused in one line naming the parameter and the range, before
the class is called, and ``gia-bench list`` shows it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import importlib
import inspect
import os
import re
import signal
import sys
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Generic, TypeVar

from gia_bench.errors import PluginError, SpecError

T = TypeVar("T")

#: Environment variable carrying the trusted ``module:Class`` names into child processes.
PLUGINS_ENV = "GIA_BENCH_PLUGINS"
_MODULE_CLASS = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
# module:Class names trusted in this process (a count, so nested ``trusted`` blocks compose).
_TRUSTED: collections.Counter[str] = collections.Counter()

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclasses.dataclass(frozen=True)
class Range:
    """The closed interval [lo, hi] a numeric constructor parameter accepts, declared in its type hint::

        def __init__(self, size: Annotated[int, Range(8, 128)] = 32): ...

    ``None`` leaves a side open. NaN is never inside.
    """

    lo: float | None = None
    hi: float | None = None

    def __contains__(self, value: Any) -> bool:
        if value is None:  # an ``X | None`` parameter left unset
            return True
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            return False
        return (self.lo is None or value >= self.lo) and (self.hi is None or value <= self.hi)

    def __str__(self) -> str:
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return f"[{lo}, {hi}]"


@dataclasses.dataclass(frozen=True)
class Param:
    """One constructor parameter, as listed by ``gia-bench list``."""

    name: str
    type: str
    default: Any
    help: str
    range: Range | None = None


@dataclasses.dataclass(frozen=True)
class Spec:
    """A parsed spec string: the name (or ``module:Class``) and its keyword values."""

    name: str
    kwargs: dict[str, str]

    def __str__(self) -> str:
        if not self.kwargs:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.kwargs.items())


def parse_spec(text: str) -> Spec:
    """Split ``name:k=v,...`` or ``module:Class[:k=v,...]`` into a :class:`Spec` (values as strings)."""
    text = text.strip()
    if not text:
        raise SpecError("empty spec: expected 'name' or 'name:key=value,...'")
    parts = text.split(":")
    # "pkg.mod:Class[:...]" names a class; "name:key=value" a registered entry.
    if len(parts) >= 2 and "=" not in parts[1] and ("." in parts[0] or parts[1][:1].isupper()):
        name, rest = f"{parts[0]}:{parts[1]}", ":".join(parts[2:])
    else:
        name, rest = parts[0], ":".join(parts[1:])
    kwargs: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise SpecError(f"spec {text!r}: {item!r} is not of the form key=value")
        if key.strip() in kwargs:
            raise SpecError(f"spec {text!r}: key {key.strip()!r} given twice")
        kwargs[key.strip()] = value.strip()
    return Spec(name.strip(), kwargs)


def plugin_name(text: str) -> str:
    """The ``module:Class`` a ``--plugin`` value names (parameters after it are ignored).

    Raises :class:`SpecError` unless ``text`` has that form.
    """
    name = parse_spec(text).name if text.strip() else ""
    if not _MODULE_CLASS.match(name):
        raise SpecError(f"--plugin {text!r}: expected module:Class (e.g. mypkg.compressors:MyCompressor)")
    return name


def _env_trusted() -> set[str]:
    return {n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()}


def is_trusted(name: str) -> bool:
    """Whether the user trusted the ``module:Class`` ``name`` (``--plugin``, :func:`trusted`, or the environment)."""
    return _TRUSTED[name] > 0 or name in _env_trusted()


def trusted_plugins() -> tuple[str, ...]:
    """Every ``module:Class`` trusted now, sorted."""
    return tuple(sorted({n for n, c in _TRUSTED.items() if c > 0} | _env_trusted()))


@contextlib.contextmanager
def trusted(plugins: Iterable[str]) -> Iterator[tuple[str, ...]]:
    """Trust the ``module:Class`` names in ``plugins`` inside the block (what ``--plugin`` does).

    Child processes started inside the block (process pools, torchrun workers) inherit
    the trust through :data:`PLUGINS_ENV`. Values are checked first (:func:`plugin_name`).

    Code run inside the block may be a plug-in's: a ``sys.exit`` from it (at import or in
    a method) raises :class:`PluginError` instead, so that no command ends with exit code 0
    and no output because a plug-in chose to (a CI gate on ``gia-bench audit`` would pass it).
    """
    names = tuple(dict.fromkeys(plugin_name(p) for p in plugins))
    previous = os.environ.get(PLUGINS_ENV)
    _TRUSTED.update(names)
    if names:
        os.environ[PLUGINS_ENV] = ",".join(trusted_plugins())
    try:
        yield names
    except SystemExit as exc:
        if isinstance(exc.code, signal.Signals):  # a signal handler's exit (Ray's SIGTERM handler), not a plug-in's
            raise
        raise PluginError(
            f"plug-in code called sys.exit({exc.code!r}) while gia-bench was running it; a plug-in must raise"
            " an exception instead"
        ) from None
    finally:
        _TRUSTED.subtract(names)
        if names:
            if previous is None:
                os.environ.pop(PLUGINS_ENV, None)
            else:
                os.environ[PLUGINS_ENV] = previous


def _missing_module_hint(module_name: str) -> str:
    """Why ``module_name`` was not found, and the fix: a console script (``gia-bench``) does not put
    the current folder on ``sys.path`` as ``python -m`` does, so ``./mycomp.py`` is not importable."""
    top = module_name.split(".")[0]
    cwd = Path.cwd()
    here = cwd / f"{top}.py" if (cwd / f"{top}.py").is_file() else cwd / top if (cwd / top).is_dir() else None
    on_path = any(Path(p or ".").resolve() == cwd.resolve() for p in sys.path if isinstance(p, str))
    if here is not None and not on_path:
        shown = f"./{here.name}" + ("/" if here.is_dir() else "")
        return (
            f"no such module; {shown} is in the current folder, but the current folder is not on sys.path:"
            " run with PYTHONPATH=. or install your package"
        )
    return "no module named " + repr(module_name) + " (install its package, or put its folder on PYTHONPATH)"


def import_plugin_module(module_name: str, what: str) -> types.ModuleType:
    """Import a trusted plug-in's module; whatever goes wrong becomes one :class:`PluginError` line.

    A plug-in's import runs third-party code: it may raise anything, or call ``sys.exit``
    (which must not end a gia-bench command with exit code 0 and no output).
    """
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # the plug-in's own module (or a package above it) is missing, not a module it imports
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise PluginError(f"{what}: cannot import module {module_name!r}: {_missing_module_hint(module_name)}") from None
        raise PluginError(f"{what}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}") from None
    except SystemExit as exc:
        raise PluginError(f"{what}: importing module {module_name!r} called sys.exit({exc.code!r})") from None
    except Exception as exc:  # third-party code at import: any exception is the plug-in's failure, one line
        raise PluginError(f"{what}: cannot import module {module_name!r}: it raised {type(exc).__name__}: {exc}") from None


@contextlib.contextmanager
def trust_suspended() -> Iterator[None]:
    """Trust nothing but registered classes inside the block (in this process and its children).

    For code that must not import a plug-in the user trusted elsewhere: the audit ranks a
    plug-in from records its battery wrote, and resolving their specs there would run it.
    """
    saved, previous = dict(_TRUSTED), os.environ.pop(PLUGINS_ENV, None)
    _TRUSTED.clear()
    try:
        yield
    finally:
        _TRUSTED.clear()
        _TRUSTED.update(saved)
        if previous is not None:
            os.environ[PLUGINS_ENV] = previous


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _convert(value: str, hint: Any, where: str) -> Any:
    """Convert a spec value to the constructor's annotated type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if type(None) in args and value.lower() in {"none", "null", ""}:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except SpecError as exc:
                errors.append(str(exc))
        raise SpecError(f"{where}: {value!r} is not a {_type_name(hint)}")
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise SpecError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if hint is bool:
        low = value.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise SpecError(f"{where}: {value!r} is not a boolean (true/false)")
    if hint is int:
        try:
            return int(value)
        except ValueError:
            try:
                as_float = float(value)
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
            raise SpecError(f"{where}: {value!r} is not an integer") from None
    if hint is float:
        try:
            return float(value)
        except ValueError:
            raise SpecError(f"{where}: {value!r} is not a number") from None
    if hint is str or hint is Any or hint is inspect.Parameter.empty:
        return value
    raise SpecError(f"{where}: parameters of type {_type_name(hint)} cannot be set from a spec")


def _docstring_params(cls: type) -> dict[str, str]:
    """Parameter help from the ``Args:`` sections (``name: text`` lines) of the class's docstring
    and, for parameters it does not describe, of its base classes' (a subclass inherits its help)."""
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        helps.update(_own_docstring_params(klass))
    return helps


def _own_docstring_params(cls: type) -> dict[str, str]:
    doc = vars(cls).get("__doc__")
    doc = inspect.cleandoc(doc) if isinstance(doc, str) else ""
    helps: dict[str, str] = {}
    in_args = False
    current = None
    for line in doc.splitlines():
        if re.match(r"^(Args|Parameters):\s*$", line):
            in_args = True
            continue
        if not in_args:
            continue
        if line and not line.startswith(" "):
            break
        match = re.match(r"^\s{2,8}(\w+)(?:\s*\([^)]*\))?:\s*(.*)$", line)
        if match:
            current = match.group(1)
            helps[current] = match.group(2).strip()
        elif current and line.strip():
            helps[current] += " " + line.strip()
    return helps


def param_ranges(cls: type) -> dict[str, Range]:
    """The :class:`Range` each parameter of ``cls.__init__`` declares (``Annotated[int, Range(lo, hi)]``)."""
    return dict(_ranges(cls))


@functools.lru_cache(maxsize=None)  # a class's hints do not change; studies resolve specs per unit
def _ranges(cls: type) -> tuple[tuple[str, Range], ...]:
    if cls.__init__ is object.__init__:
        return ()
    hints = typing.get_type_hints(cls.__init__, include_extras=True)
    ranges = []
    for name, hint in hints.items():
        declared = [m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Range)]
        if declared:
            ranges.append((name, declared[0]))
    return tuple(ranges)


def check_ranges(kind: str, name: str, cls: type, kwargs: dict[str, Any]) -> None:
    """Raise :class:`SpecError` naming the parameter and its range for a value of ``kwargs`` outside it."""
    for key, bounds in param_ranges(cls).items():
        if key in kwargs and kwargs[key] not in bounds:
            raise SpecError(f"{kind} {name!r} parameter {key!r}: {kwargs[key]!r} is outside its range {bounds}")


def describe_params(cls: type) -> list[Param]:
    """The keyword parameters of ``cls`` with type, default, help text and range (shown in the help)."""
    return list(_describe(cls))


@functools.lru_cache(maxsize=None)  # signatures, hints and docstrings are read once per class: a
def _describe(cls: type) -> tuple[Param, ...]:  # study's planning resolves a spec per unit
    hints = typing.get_type_hints(cls.__init__) if cls.__init__ is not object.__init__ else {}
    ranges = param_ranges(cls)
    helps = _docstring_params(cls)
    params = []
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = None if p.default is p.empty else p.default
        text = helps.get(name, "")
        if name in ranges:
            text = f"{text} (range {ranges[name]})" if text else f"range {ranges[name]}"
        params.append(Param(name, _type_name(hints.get(name, str)), default, text, ranges.get(name)))
    return tuple(params)


def summary(cls: type) -> str:
    """First line of the class docstring."""
    doc = inspect.getdoc(cls) or ""
    return doc.splitlines()[0] if doc else ""


class Registry(Generic[T]):
    """A name -> class table for one kind of component (defenses, attacks, ...)."""

    def __init__(
        self, kind: str, entry_point_group: str | None = None, base: type | Callable[[], type] | None = None
    ) -> None:
        """``base``: the class every entry must subclass (or a function returning it, when the
        base is defined after the registry); checked before a plug-in is ever called."""
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._base = base
        self._classes: dict[str, type[T]] = {}
        self._entry_point_names: set[str] = set()
        self._loaded_entry_points = False

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: make ``cls`` available as ``name``."""

        def wrap(cls: type[T]) -> type[T]:
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._classes[name] = cls
            cls.registry_name = name  # type: ignore[attr-defined]
            return cls

        return wrap

    @property
    def base(self) -> type | None:
        base = self._base
        if base is not None and not isinstance(base, type):
            base = self._base = base()
        return base

    def _check_base(self, name: str, cls: Any, origin: str) -> type[T]:
        """``cls`` must be a class deriving from the registry's base; nothing of it has run yet."""
        if not isinstance(cls, type):
            raise SpecError(f"{self.kind} {name!r} ({origin}) is a {type(cls).__name__}, not a class")
        base = self.base
        if base is not None and not issubclass(cls, base):
            raise SpecError(
                f"{self.kind} {name!r} ({origin}) is not a {base.__module__}.{base.__qualname__} subclass; refused"
            )
        return cls

    def _load_entry_points(self) -> None:
        if self._loaded_entry_points or self.entry_point_group is None:
            return
        self._loaded_entry_points = True
        for ep in entry_points(group=self.entry_point_group):
            if ep.name not in self._classes:
                try:
                    cls = ep.load()
                except (Exception, SystemExit) as exc:  # a broken plug-in must not break the built-ins
                    raise PluginError(
                        f"{self.kind} entry point {ep.name!r} ({ep.value}) failed to load: {exc}"
                    ) from exc
                self._classes[ep.name] = self._check_base(ep.name, cls, f"entry point {ep.value}")
                self._entry_point_names.add(ep.name)
                if "registry_name" not in vars(cls):  # a subclass of a built-in gets its own name
                    cls.registry_name = ep.name

    def is_builtin(self, name: str) -> bool:
        """Whether ``name`` is registered by gia-bench itself (no entry point or module is loaded to tell)."""
        return name in self._classes and name not in self._entry_point_names

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._classes)

    def items(self) -> list[tuple[str, type[T]]]:
        return [(name, self._classes[name]) for name in self.names()]

    def get(self, name: str) -> type[T]:
        """The class for a registered name, an entry point, or a trusted ``module:Class``.

        An untrusted ``module:Class`` is refused without importing anything; a trusted
        one must be a subclass of the registry's base (checked before it is called).
        """
        if name in self._classes:
            return self._classes[name]
        self._load_entry_points()
        if name in self._classes:
            return self._classes[name]
        if ":" in name:
            if not _MODULE_CLASS.match(name):
                raise SpecError(f"{self.kind} {name!r}: expected a registered name or module:Class")
            if not is_trusted(name):
                raise SpecError(
                    f"{self.kind} {name!r} is not registered and not trusted; code named by a spec is loaded"
                    f" only when you trust it: --plugin {name}"
                )
            module_name, _, attr = name.partition(":")
            module = import_plugin_module(module_name, f"{self.kind} {name!r}")
            cls = getattr(module, attr, None)
            if not isinstance(cls, type):
                raise SpecError(f"{self.kind} {name!r}: module {module_name!r} has no class {attr!r}")
            return self._check_base(name, cls, "trusted plug-in")
        raise SpecError(
            f"unknown {self.kind} {name!r}; accepted: {', '.join(self.names())} (or module:Class)"
        )

    def kwargs_for(self, spec: Spec | str) -> tuple[type[T], dict[str, Any]]:
        """Resolve a spec to its class and the converted constructor keyword arguments."""
        if isinstance(spec, str):
            spec = parse_spec(spec)
        cls = self.get(spec.name)
        params = {p.name: p for p in describe_params(cls)}
        hints = typing.get_type_hints(cls.__init__) if cls.__init__ is not object.__init__ else {}
        kwargs = {}
        for key, value in spec.kwargs.items():
            if key not in params:
                accepted = ", ".join(params) or "no parameters"
                raise SpecError(f"{self.kind} {spec.name!r}: unknown parameter {key!r}; accepted: {accepted}")
            kwargs[key] = _convert(value, hints.get(key, str), f"{self.kind} {spec.name!r} parameter {key!r}")
        check_ranges(self.kind, spec.name, cls, kwargs)
        return cls, kwargs

    def create(self, spec: Spec | str, **overrides: Any) -> T:
        """Build an instance from a spec string; ``overrides`` win over spec values."""
        cls, kwargs = self.kwargs_for(spec)
        kwargs.update(overrides)
        if overrides:
            check_ranges(self.kind, parse_spec(spec).name if isinstance(spec, str) else spec.name, cls, overrides)
        try:
            return cls(**kwargs)
        except SpecError:
            raise
        except (TypeError, ValueError) as exc:
            raise SpecError(f"{self.kind} {spec}: {exc}") from exc


def canonical_spec(obj: Any) -> str:
    """The spec string that rebuilds ``obj``: its registry name and every parameter value.

    The name is the one registered for ``type(obj)`` itself, never one inherited from a
    registered base class: ``class Mine(TopK)`` loaded as ``module:Mine`` keeps
    ``module:Mine``, so its records do not claim to be ``topk``.
    """
    cls = type(obj)
    name = vars(cls).get("registry_name") or f"{cls.__module__}:{cls.__qualname__}"
    parts = []
    for p in describe_params(cls):
        if hasattr(obj, p.name):
            value = getattr(obj, p.name)
            if isinstance(value, bool):
                value = str(value).lower()
            parts.append(f"{p.name}={value}")
    return name + (":" + ",".join(parts) if parts else "")


def display_spec(spec: str, registry: Registry[Any]) -> str:
    """``spec`` without the parameters left at their defaults (``topk:ratio=0.01``), for tables and legends.

    A spec that does not resolve here (an unknown or untrusted plug-in) is shown as written.
    """
    try:
        parsed = parse_spec(spec)
        cls, kwargs = registry.kwargs_for(parsed)
        defaults = {p.name: p.default for p in describe_params(cls)}
    except (SpecError, PluginError, ImportError, AttributeError, TypeError, ValueError):
        return spec
    except Exception as exc:  # another GiaBenchError subclass: shown in full, never a crash in a table
        from gia_bench.errors import GiaBenchError

        if isinstance(exc, GiaBenchError):
            return spec
        raise
    keep = [f"{k}={parsed.kwargs[k]}" for k, v in kwargs.items() if k not in defaults or v != defaults[k]]
    return parsed.name + (":" + ",".join(keep) if keep else "")

