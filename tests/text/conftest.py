import pytest

from gia_bench.text.deps import available

# Text tests need the text extra (transformers, faker, rouge-score, the MiniLM wheel);
# without it they skip, with the install command as the reason.
_missing = available()


def pytest_collection_modifyitems(config, items):
    if _missing is None:
        return
    for item in items:
        if "tests/text/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.skip(reason=_missing))
