"""The curvature structures are classes registered by key (`bench.la.structures`): their names are compared
nowhere else in the code, a new one is one class, and the per-structure operations agree with the
curvature they act on."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from bench.errors import BenchError
from bench.la.curvature import DiagGGN
from bench.la.structures import (
    STRUCTURES,
    Diag,
    compute_curvature,
    get_structure,
    online_structures,
    register_structure,
)
from tests.laplace_helpers import tiny_data, tiny_net

M = 8  # mining batch

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "methods", "reports", "datasets", "backbones")
REGISTRATION = ROOT / "bench" / "la" / "structures.py"
# laplace-torch's own hessian_structure vocabulary (another library's keys, not ours)
FOREIGN = {ROOT / "methods" / "laplace_torch.py", ROOT / "bench" / "tools" / "hessian_bench.py"}


def _names(node: ast.AST) -> set[str]:
    """The string constants of a comparison operand (a literal, or a tuple/list/set of them)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {v for e in node.elts for v in _names(e)}
    return set()


def structure_comparisons(path: Path, keys: set[str]) -> list[str]:
    """`file:line` of every comparison (==, !=, in, not in) of an expression that mentions "structure"
    with a literal structure key."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        literal = set().union(*(_names(o) for o in operands)) & keys
        mentions = any("structure" in ast.unparse(o) for o in operands if not _names(o))
        if literal and mentions:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_structure_name_is_compared_outside_its_class():
    keys = set(STRUCTURES)
    files = [
        p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if p != REGISTRATION and p not in FOREIGN
    ]
    assert len(files) > 50
    hits = [h for p in files for h in structure_comparisons(p, keys)]
    assert hits == []


def test_the_grep_finds_a_structure_comparison(tmp_path):
    """The check above can fail: it finds the kinds of comparison the structures replaced."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        'if s.structure == "kron":\n    pass\nok = self.structure in ("diag", "full")\n'
        'fine = subset == "last_layer"\n'
    )
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        assert len(structure_comparisons(bad, set(STRUCTURES))) == 2
    finally:
        ROOT = old


def test_registry_keys_match_the_accumulators_tags_and_unknown_keys_fail():
    assert list(STRUCTURES) == ["full", "last_layer", "diag", "kron"]
    for key, s in STRUCTURES.items():
        assert s.key == key == s.accumulator.structure
    assert set(online_structures()) == {"last_layer", "diag", "kron"}
    with pytest.raises(BenchError, match="structure must be one of full, last_layer, diag, kron"):
        get_structure("block")


def test_a_new_structure_is_one_class():
    """A structure registered by one class is found by key, resolves its subset and runs the shared
    curvature driver (here a diagonal over the last layer only)."""

    class LastLayerDiagGGN(DiagGGN):
        structure, subset = "last_layer_diag", "last_layer"

    @register_structure
    class LastLayerDiag(Diag):
        key, accumulator = "last_layer_diag", LastLayerDiagGGN
        auto_subset = auto_subset_with_head = "last_layer"
        fixed_subset = True

    try:
        model, (x, y) = tiny_net(), tiny_data(40)
        assert get_structure("last_layer_diag") is LastLayerDiag
        assert LastLayerDiag.resolve_subset("all", model) == "last_layer"
        curv = compute_curvature(model, x, y, structure="last_layer_diag", mining_batch=M)
        ll = compute_curvature(model, x, y, structure="last_layer", mining_batch=M)
        assert torch.allclose(curv.H, ll.H.diagonal())
        assert get_structure(curv.structure).trace(curv) == pytest.approx(float(ll.H.diagonal().sum()))
    finally:
        STRUCTURES.pop("last_layer_diag", None)


@pytest.mark.parametrize("key", list(STRUCTURES))
def test_structure_arithmetic_agrees_with_the_curvature(key):
    """trace, diagonal, scaled (a copy) and scale_ (in place) of each structure, against the dense H."""
    model, (x, y) = tiny_net(), tiny_data(40)
    s = get_structure(key)
    curv = compute_curvature(model, x, y, structure=key, mining_batch=M)

    def dense(c):
        if c.kron is not None:
            return torch.block_diag(*[torch.kron(f.G, f.A) for f in c.kron])
        return torch.diag(c.H) if c.H.dim() == 1 else c.H

    H = dense(curv).clone()
    assert s.trace(curv) == pytest.approx(float(H.diagonal().sum()), rel=1e-5)
    assert torch.allclose(s.diagonal(curv), H.diagonal(), rtol=1e-5, atol=1e-7)
    assert torch.allclose(dense(s.scaled(curv, 3.0)), 3.0 * H, rtol=1e-5, atol=1e-6)
    assert torch.allclose(dense(curv), H)  # the copy left it alone
    s.scale_(curv, 2.0)
    assert torch.allclose(dense(curv), 2.0 * H, rtol=1e-5, atol=1e-6)
