"""Every tagged code example of README.md and docs/ is run by a test, and every example a test runs
is tagged: found by tag (tests/doc_examples.py), so moving or renaming a heading never loses one."""

from __future__ import annotations

import ast

from tests.doc_examples import REPO, example, tagged_examples


def _examples_the_tests_run() -> dict[str, list[str]]:
    """{example name: the test files that take it with example("name", ...)}, read from the tests' source."""
    taken: dict[str, list[str]] = {}
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "example" and node.args
                    and isinstance(node.args[0], ast.Constant)):
                taken.setdefault(node.args[0].value, []).append(str(path.relative_to(REPO)))
    return taken


def test_every_tagged_example_is_run_by_a_test_and_every_example_run_is_tagged():
    tagged, taken = tagged_examples(), _examples_the_tests_run()
    assert tagged, "no tagged examples found: is the tag syntax <!-- example: NAME --> above a fenced block?"
    untested = {name: str(e.file.relative_to(REPO)) for name, e in tagged.items() if name not in taken}
    assert not untested, f"tagged examples no test runs: {untested}"
    missing = {name: files for name, files in taken.items() if name not in tagged}
    assert not missing, f"tests take examples that no document tags: {missing}"


def test_the_tagged_python_examples_compile():
    for name, found in tagged_examples().items():
        if found.language == "python":
            compile(found.code, f"{found.file.name} (example {name})", "exec")


def test_the_plain_zarr_example_gives_each_kinds_probabilities(tmp_path, teacher_weights):
    """Example plain-zarr-probabilities on a dense cache and on top-k and sampled token caches:
    re-tempered probabilities that are the stored logits' softmax at T', kept mass and tail that
    make up 1, and draws whose shares sum to 1 at each real token."""
    import numpy as np

    from stages.cache import CacheReader
    from tests.conftest import cache_with_cli, invoke_json

    dense = cache_with_cli(tmp_path / "dense.zarr", teacher_weights)["cache"]
    tokens = "stdlib-bytes:seq=16,train=2000,test=0"
    for name, kind in (("top.zarr", ("--format", "topk", "--top-k", "8")), ("drawn.zarr", ("--format", "sampled", "--samples", "12"))):
        invoke_json("cache-teacher", "--teacher", "bytelm:dim=16,layers=1,heads=2", "--dataset", tokens, "--temperature", "1",
                    *kind, "--device", "cpu", "--out", str(tmp_path / name))
    code = example("plain-zarr-probabilities", DENSE=repr(str(dense)), TOPK=repr(str(tmp_path / "top.zarr")),
                   SAMPLED=repr(str(tmp_path / "drawn.zarr")))
    found: dict = {}
    exec(compile(code, "example plain-zarr-probabilities", "exec"), found)  # noqa: S102 - the project's own documentation

    reader = CacheReader(dense)
    stored = reader.read_rows(0, reader.num_samples)
    z = stored["logits"].astype(np.float64) * reader.temperature / found["T_new"]
    expected = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(found["p"], expected / expected.sum(1, keepdims=True), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(found["rows"], stored["index"])
    assert ((found["tail_mass"] > -1e-3) & (found["tail_mass"] < 1)).all() and found["tail_mass"].size
    np.testing.assert_allclose(found["share"].sum(-1)[found["valid"]], 1.0)
