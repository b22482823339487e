"""Every function of the package fits on a screen (issue 22: at most 80 lines), so a newcomer
reads one step at a time; a longer one is split where its steps are."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("stoker", "trainer", "tune", "datasets", "cluster")
LIMIT = 80


def test_no_function_is_longer_than_80_lines():
    long = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > LIMIT:
                        long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []
    assert any((REPO / package).is_dir() for package in PACKAGES)  # the walk found the code
