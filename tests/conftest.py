import os

# OpenMP threads that spin while waiting starve every other process on a shared or small
# machine (a suite stalled for minutes at one test with ~10 suites running); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("MPLCONFIGDIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "gia-bench-mpl"))
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def gen() -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(0)
    return g


def pytest_collection_modifyitems(config, items):
    """Text tests need the text extra (transformers, faker, rouge-score, the MiniLM wheel); without
    it they skip, with the install command as the reason. (Here, not in tests/text/conftest.py: a
    second ``conftest`` module there would shadow the ``from conftest import ...`` of other tests.)"""
    if not any("tests/text/" in str(item.fspath).replace("\\", "/") for item in items):
        return
    from gia_bench.text.deps import available

    missing = available()
    if missing is None:
        return
    for item in items:
        if "tests/text/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.skip(reason=missing))


@pytest.fixture
def sigint_as_in_a_terminal():
    """Children started during the test get Ctrl-C as from a terminal, however pytest was started.

    A shell starts a background job (``cmd &``, ``nohup cmd &``, CI runners) with SIGINT
    ignored; an ignored signal stays ignored through exec, Python then installs no
    KeyboardInterrupt handler, and the command under test would rightly ignore the test's
    Ctrl-C. A handled signal is reset to the default by exec: handle it while the test runs.
    """
    import signal

    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if previous is signal.SIG_IGN:
            signal.signal(signal.SIGINT, previous)


@pytest.fixture(autouse=True)
def _sigint_restored():
    """Each test leaves Ctrl-C's handler as it found it: a command run in-process that handled a
    Ctrl-C ignores the next one (``cli.base.mark_interrupted``), and a later test's child process
    would inherit that and ignore the Ctrl-C it is sent."""
    import signal

    previous = signal.getsignal(signal.SIGINT)
    yield
    if signal.getsignal(signal.SIGINT) is not previous and previous is not None:
        signal.signal(signal.SIGINT, previous)
