"""The house rules a newcomer relies on, checked: Lightning only in the training package, no
references to documents outside the repository, an architecture map and an API page that match
the code."""

import ast
import re
import subprocess
import sys

from conftest import ROOT

PACKAGE = ROOT / "smooseg"
SOURCES = sorted(p for p in PACKAGE.rglob("*.py"))


def imported_modules(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_lightning_is_imported_only_by_the_training_package():
    outside = {p.relative_to(ROOT).as_posix() for p in SOURCES if "train" not in p.relative_to(PACKAGE).parts
               for name in imported_modules(p) if name.split(".")[0] in ("pytorch_lightning", "lightning")}
    assert outside == set()


def test_the_model_package_is_plain_pytorch():
    """smooseg.model imports neither the training nor the evaluation package."""
    for path in (PACKAGE / "model").glob("*.py"):
        upward = [m for m in imported_modules(path) if m.startswith(("smooseg.train", "smooseg.eval"))]
        assert not upward, path


def test_no_citations_of_documents_outside_the_repository():
    pattern = re.compile(r"\bSPEC\b|\.\./shared|\bissue #\d|\bIssue #\d")
    files = (SOURCES + sorted((ROOT / "tests").glob("*.py"))
             + sorted((ROOT / "smooseg" / "configs").rglob("*.yaml"))
             + [ROOT / "README.md", ROOT / "docs" / "method.md"])
    cited = [f"{p.relative_to(ROOT)}:{n}" for p in files
             for n, line in enumerate(p.read_text().splitlines(), 1)
             if pattern.search(line) and p.name != "test_house.py"]
    assert cited == []


def test_readme_architecture_map_names_every_module():
    readme = ROOT.joinpath("README.md").read_text()
    block = readme[readme.index("## Architecture"):readme.index("## Performance")]
    missing = [p.relative_to(ROOT).as_posix() for p in SOURCES
               if p.name != "__init__.py" and p.name not in block]
    assert missing == []
    named = set(re.findall(r"\b(\w+\.py)\b", block))
    existing = {p.name for p in SOURCES} | {p.name for p in ROOT.glob("*.py")}
    assert named <= existing, named - existing


def test_api_page_is_current():
    proc = subprocess.run([sys.executable, str(ROOT / "docs" / "api.py"), "--check"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
