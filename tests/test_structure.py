"""Structure rules of issue 18 (torchtune's "nothing imports a recipe"): only the entrypoint and the debug modes
import ``embclf.stages``; the library, the commands, the report and the benchmarks use the library layer
(``embclf.engine``, ``checkpoint``, ``images``, ``artefacts``, ``lifecycle``)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {"embclf/__main__.py", "embclf/debug.py"}


def _imports_stages(path: Path) -> list:
    """The lines of ``path`` that import ``embclf.stages`` (absolute or relative, module or from-import)."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])  # e.g. embclf or embclf.report
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the file's package
                parts = package.split(".")
                parts = parts[:len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = ".".join(parts + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        if any(n == "embclf.stages" or n.startswith("embclf.stages.") for n in names):
            hits.append(node.lineno)
    return hits


def test_nothing_but_the_entrypoint_and_debug_imports_the_stages():
    files = [p for d in ("embclf", "hydra_plugins", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    offenders = {str(p.relative_to(ROOT)): lines for p in files
                 if not str(p.relative_to(ROOT)).startswith("embclf/stages/")
                 and str(p.relative_to(ROOT)) not in ALLOWED and (lines := _imports_stages(p))}
    assert not offenders, f"these import embclf.stages (use the library layer instead): {offenders}"


def test_the_checker_sees_every_spelling(tmp_path, monkeypatch):
    """The rule's own test: absolute, relative and from-imports of the stages are all found."""
    pkg = ROOT / "embclf"
    probe = pkg / "_probe_structure_tmp.py"
    try:
        for src in ("from .stages import autoencode\n", "from .stages.classify import run\n",
                    "import embclf.stages.autoencode\n", "from embclf.stages import classify\n",
                    "from . import stages\n"):
            probe.write_text(src)
            assert _imports_stages(probe), src
        probe.write_text("from . import engine, images\nfrom .models import build_model\n")
        assert not _imports_stages(probe)
    finally:
        probe.unlink(missing_ok=True)


def test_the_stages_are_short_recipes():
    for name in ("autoencode.py", "classify.py"):
        n = len((ROOT / "embclf" / "stages" / name).read_text().splitlines())
        assert n < 300, f"embclf/stages/{name} has {n} lines: a recipe reads top to bottom, the rest is library"


def test_the_longest_first_order_names_existing_test_files():
    """conftest.LONGEST_FIRST (the order xdist hands files out in) names test files that exist: a renamed file
    would silently drop to the end of the run."""
    from conftest import LONGEST_FIRST

    here = Path(__file__).parent
    assert [n for n in LONGEST_FIRST if not (here / n).is_file()] == []
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
