"""The lab's package (workloads/owca_workloads) has no import cycle: no module imports,
through any chain and at any depth of its code, one that imports it back."""
import os

from conftest import ROOT
from import_graph import cycles, graph

PACKAGE = os.path.join(ROOT, "workloads", "owca_workloads")


def test_the_labs_package_has_no_import_cycle():
    edges = graph(PACKAGE)
    assert "owca_workloads.scenario" in edges and "owca_workloads.score" in edges
    assert [" -> ".join(c) for c in cycles(edges)] == []


def test_the_checker_sees_a_cycle_closed_by_an_import_inside_a_function(tmp_path):
    """The test can fail: a imports b at the top, b imports a only inside a function."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("import os\n\ndef f():\n    from pkg.a import x\n")
    (package / "c.py").write_text("from . import a\n")
    edges = graph(str(package))
    assert edges == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.a"}}
    assert cycles(edges) == [["pkg.a", "pkg.b", "pkg.a"]]
