"""What every program does before its Hydra task runs: answer ``--help`` with the program's own
page (fast: nothing heavy is imported), else rewrite the command line and start Hydra."""

import ast
import importlib.util
import sys
from pathlib import Path

from smooseg.cli import prepare_argv

PACKAGE_DIR = Path(__file__).resolve().parents[1]
CONFIG_DIR = PACKAGE_DIR / "configs"  # shipped inside the package
HELP_FLAGS = ("--help", "-h")
LAUNCHERS = ("submitit_local", "submitit_slurm")  # Hydra's submitit plugin (pip install smooseg[slurm])


def launch(task, name, description, examples):
    """Run the Hydra ``task`` of the program ``smooseg-<name>`` (config ``<name>.yaml``), or print its
    help page when the command line asks for it."""
    if any(arg in HELP_FLAGS for arg in sys.argv[1:]):
        print(help_page(name, description, examples))
        return
    prepare_argv()
    import smooseg.settings  # noqa: F401  (registers the typed schemas the configs compose on)

    task()


def help_page(name, description, examples):
    """The ``--help`` page: the program's description, the commands to start from, its settings
    with their defaults and comments (the config file's own text), and the presets it accepts."""
    groups = config_groups((CONFIG_DIR / f"{name}.yaml").read_text())
    lines = [f"smooseg-{name}: {description.strip()}", "",
             f"Usage: smooseg-{name} [key=value | --key value ...]"
             + (" [group=preset ...]" if groups else ""),
             "",
             "Start from:", *(f"  {example}" for example in examples), "",
             "Settings (declared in smooseg/settings.py; key: default  # meaning):",
             *(f"  {line}" for line in settings_lines(name)), ""]
    if groups:
        lines.append("Presets (group=preset; * marks the default):")
        lines += [f"  {group}: {' | '.join(presets)}" for group, presets in groups.items()]
        lines.append("")
    lines.append("--cfg job prints the composed config; --hydra-help lists Hydra's own options"
                 + ("; -m runs a sweep (key=a,b,c)" if "hydra/launcher" in groups else "") + ".")
    return "\n".join(lines)


SCHEMA_SOURCES = ("settings.py", "model/losses.py")  # where the schemas' dataclasses are written
SCHEMAS = {"train": "TrainSettings", "eval": "EvalSettings", "segment": "SegmentSettings",
           "crop": "CropSettings", "download": "DownloadSettings"}
# Sections composed as plain dicts (so that Hydra takes keys the schema lacks) and typed afterwards.
COMPOSED_AS_DICT = {"trainer": "TrainerSettings"}


def schema_classes():
    """``{class name: [(field, default text or "section:<class>", comment), ...]}`` of the
    dataclasses in :data:`SCHEMA_SOURCES`, read from their source text (nothing is imported, so
    --help stays fast). A field's comment is the one on its line and the comment-only lines below it."""
    classes, sources = {}, []
    for relative in SCHEMA_SOURCES:
        lines = (PACKAGE_DIR / relative).read_text().splitlines()
        sources.append((ast.parse("\n".join(lines)), lines))
    constants = {node.name: node.body[-1].value for tree, _ in sources for node in tree.body
                 if isinstance(node, ast.FunctionDef) and isinstance(node.body[-1], ast.Return)}
    names = {node.name for tree, _ in sources for node in tree.body if isinstance(node, ast.ClassDef)}
    for tree, lines in sources:
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                classes[node.name] = [
                    _field(item, lines, names, constants) for item in node.body
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)]
    return classes


def _field(item, lines, classes, functions):
    name = item.target.id
    comment = []
    line = lines[item.lineno - 1]
    if "  # " in line:
        comment.append(line.split("  # ", 1)[1].strip())
    for below in lines[item.end_lineno:]:
        if not below.strip().startswith("# ") or not below.startswith(" " * 8):
            break
        comment.append(below.strip()[2:])
    section = COMPOSED_AS_DICT.get(name) or _annotated_class(item.annotation, classes)
    default = f"section:{section}" if section else _default(item.value, functions)
    return name, default, " ".join(comment)


def _annotated_class(annotation, classes):
    """The dataclass an annotation names (``X``, ``X | None`` or ``Optional[X]``), else None."""
    if isinstance(annotation, ast.BinOp) and isinstance(annotation.right, ast.Constant):
        annotation = annotation.left
    if isinstance(annotation, ast.Subscript):
        annotation = annotation.slice
    return annotation.id if isinstance(annotation, ast.Name) and annotation.id in classes else None


def _default(value, functions):
    """The default a field's right-hand side gives, as YAML text."""
    if value is None or (isinstance(value, ast.Name) and value.id == "MISSING"):
        return "???"
    if isinstance(value, ast.Call):
        keywords = {k.arg: k.value for k in value.keywords}
        factory = keywords.get("default_factory", keywords.get("factory"))
        if isinstance(factory, ast.Lambda):
            return _default(factory.body, functions)
        if isinstance(factory, ast.Name):
            empty = {"list": "[]", "dict": "{}"}.get(factory.id)
            return empty or _default(functions.get(factory.id), functions)
        if "default" in keywords:
            return _default(keywords["default"], functions)
        return _default(value.args[0], functions) if value.args else "???"
    try:
        return _yaml_text(ast.literal_eval(value))
    except ValueError:
        return ast.unparse(value)


def _yaml_text(value):
    """A literal as YAML writes it: true / false / null, [a, b], {k: v}."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def settings_lines(name):
    """``key: default  # comment`` for every setting of the program ``name``, sections indented."""
    classes = schema_classes()
    out = []

    def walk(cls, indent):
        for key, default, comment in classes[cls]:
            section = default.removeprefix("section:")
            if section != default and section in classes:
                out.append(f"{indent}{key}:" + (f"  # {comment}" if comment else ""))
                walk(section, indent + "  ")
                continue
            out.append(f"{indent}{key}: {default}" + (f"  # {comment}" if comment else ""))

    walk(SCHEMAS[name], "")
    return out


def config_groups(text):
    """``{group: [preset, ...]}`` for the groups a config's ``defaults`` list names (the chosen
    one marked ``*``; none marked when the default is null), plus the launchers for a program
    that sweeps (``hydra.sweep`` set)."""
    import yaml

    config = yaml.safe_load(text)
    groups = {}
    for entry in config.get("defaults", []):
        if not isinstance(entry, dict):
            continue
        ((group, default),) = entry.items()
        if group.startswith("override "):
            continue
        presets = sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml") if path.stem != "base")
        groups[group] = [f"{p}*" if p == default else p for p in presets]
    if "sweep" in (config.get("hydra") or {}):
        installed = importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
        groups["hydra/launcher"] = ["basic*", *(LAUNCHERS if installed else
                                                ("(pip install smooseg[slurm] for submitit_local, "
                                                 "submitit_slurm)",))]
    return groups
