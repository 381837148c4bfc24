"""The attacker's views are named in one place (issue 15.9)."""

import ast
from pathlib import Path

import gia_bench
from gia_bench.reports import writers
from gia_bench.threat import VIEWS


def test_views_are_defined_once():
    package = Path(gia_bench.__file__).parent
    defined = []
    for file in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == "VIEWS" for t in targets):
                    defined.append(file.relative_to(package).as_posix())
    # threat.py names them; the report's legend describes each of them (a dict keyed by view)
    assert sorted(defined) == ["reports/writers.py", "threat.py"]
    assert VIEWS == ("naive", "aware", "oracle")
    assert tuple(writers.VIEWS) == VIEWS
