"""No test bounds a child process by a fixed time under 30 minutes: a 300 s timeout on a sweep
failed the suite on a busy machine. Tests wait on what they can observe (a line, a file, an exit);
a bound is only against a hang, and a loaded machine may take many times longer than a quiet one."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
HANG_BOUND = 1800  # seconds
# subprocess.run / check_output / call, Popen.wait / communicate
BOUNDED_CALLS = {"run", "check_output", "call", "wait", "communicate"}


def test_no_subprocess_call_or_wait_has_a_timeout_under_30_minutes():
    short = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in BOUNDED_CALLS:
                for keyword in node.keywords:
                    value = keyword.value
                    if (keyword.arg == "timeout" and isinstance(value, ast.Constant) and isinstance(value.value, (int, float))
                            and value.value < HANG_BOUND):
                        short.append(f"{path.relative_to(TESTS)}:{node.lineno} timeout={value.value}")
    assert not short, short
