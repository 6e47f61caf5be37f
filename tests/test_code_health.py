"""Comments and docstrings describe the code as it is: no issue numbers (that history is git's)."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("supersub", "jobs", "serve", "tests", "benchmarks")
ISSUE = re.compile(r"\bissues?\s*#?\s*\d+", re.IGNORECASE)


def comments_and_docstrings(source: str) -> list[tuple[int, str]]:
    """``(line, text)`` of every comment and every line of every docstring of a module."""
    out = [
        (tok.start[0], tok.string)
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    ]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                out += [(first.lineno + i, line) for i, line in enumerate(first.value.value.splitlines())]
    return out


def test_no_issue_numbers_in_comments_or_docstrings() -> None:
    found = [
        f"{path.relative_to(REPO)}:{line}: {text.strip()}"
        for folder in FOLDERS
        for path in sorted((REPO / folder).rglob("*.py"))
        for line, text in comments_and_docstrings(path.read_text())
        if ISSUE.search(text)
    ]
    assert not found, "issue numbers in comments or docstrings (say why the code is so instead):\n" + "\n".join(found)


def test_the_check_sees_comments_and_docstrings_only() -> None:
    source = (
        '"""Module (Issue 7)."""\n'
        "x = 'issue 8 in a string is code'  # issue 9\n"
        "def f():\n"
        '    """First line.\n\n    issues #10 and 11."""\n'
    )
    hits = [(line, text) for line, text in comments_and_docstrings(source) if ISSUE.search(text)]
    assert hits == [(2, "# issue 9"), (1, "Module (Issue 7)."), (6, "    issues #10 and 11.")]
