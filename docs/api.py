"""Write docs/API.md: every public class and function of the package with its signature and the
first paragraph of its docstring, module by module in the order the data flows.

    python docs/api.py          # rewrite docs/API.md
    python docs/api.py --check  # exit 1 when docs/API.md is out of date (the test suite runs this)
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "docs" / "API.md"
INTRO = """# smooseg API (for contributors)

Generated from the code by `python docs/api.py`; `make test` fails when it is out of date, so
this page always says what the code offers. Every user-facing failure raises
`smooseg.errors.SmoosegError` with a one-line message naming the file or key and the fix; the
entry points print it as `error: <message>` and exit with status 2. The method these functions
compute is docs/method.md; the layout is the README's Architecture section.
"""
PACKAGES = ("smooseg", "smooseg/model", "smooseg/data", "smooseg/train", "smooseg/eval")


def _first_paragraph(doc):
    return " ".join(doc.strip().split("\n\n")[0].split()) if doc else ""


def _signature(fn):
    return f"{fn.name}({ast.unparse(fn.args)})"


def _constant(node):
    value = ast.unparse(node.value)
    names = ", ".join(t.id for t in node.targets)
    return f"{names} = {value if len(value) <= 90 else value[:87] + '...'}"


def _public(node):
    return not node.name.startswith("_")


def describe_module(path):
    """The Markdown section of one module."""
    tree = ast.parse(path.read_text())
    lines = [f"## {path.relative_to(ROOT).as_posix()}", _first_paragraph(ast.get_docstring(tree)), "", "```"]
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and _public(node):
            lines += [_signature(node), f"    # {_first_paragraph(ast.get_docstring(node))}"]
        elif isinstance(node, ast.ClassDef) and _public(node):
            bases = ", ".join(ast.unparse(b) for b in node.bases)
            lines += [f"class {node.name}({bases})", f"    # {_first_paragraph(ast.get_docstring(node))}"]
            lines += [f"    {_signature(sub)}" for sub in node.body
                      if isinstance(sub, ast.FunctionDef) and (_public(sub) or sub.name == "__init__")]
        elif isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper()
                                                  and not t.id.startswith("_") for t in node.targets):
            lines.append(_constant(node))
    return "\n".join(lines + ["```", ""])


def render():
    """The whole of docs/API.md."""
    modules = [p for package in PACKAGES for p in sorted((ROOT / package).glob("*.py"))
               if p.name != "__init__.py"]
    return "\n".join([INTRO] + [describe_module(p) for p in modules])


def main(argv):
    text = render()
    if "--check" in argv:
        if TARGET.read_text() != text:
            print(f"{TARGET} is out of date: run python docs/api.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
