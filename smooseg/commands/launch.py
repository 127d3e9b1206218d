"""What every program does before its Hydra task runs: answer ``--help`` with the program's own
page (fast: nothing heavy is imported), else rewrite the command line and start Hydra."""

import importlib.util
import sys
from pathlib import Path

from smooseg.cli import prepare_argv

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # shipped inside the package
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
    text = (CONFIG_DIR / f"{name}.yaml").read_text()
    groups = config_groups(text)
    lines = [f"smooseg-{name}: {description.strip()}", "",
             f"Usage: smooseg-{name} [key=value | --key value ...]" + (" [group=preset ...]" if groups else ""),
             "",
             "Start from:", *(f"  {example}" for example in examples), "",
             f"Settings (smooseg/configs/{name}.yaml; key: default  # meaning):",
             *(f"  {line}" for line in settings_lines(text)), ""]
    if groups:
        lines.append("Presets (group=preset; * marks the default):")
        lines += [f"  {group}: {' | '.join(presets)}" for group, presets in groups.items()]
        lines.append("")
    lines.append("--cfg job prints the composed config; --hydra-help lists Hydra's own options"
                 + ("; -m runs a sweep (key=a,b,c)" if "hydra/launcher" in groups else "") + ".")
    return "\n".join(lines)


def settings_lines(text):
    """The lines of a config file that set its keys: without the leading comment block (the
    description says it), the ``defaults`` list and the ``hydra`` section."""
    lines, skipping, started = [], False, False
    for line in text.splitlines():
        top = line[:1] not in ("", " ", "#")
        if top:
            skipping = line.split(":", 1)[0] in ("defaults", "hydra")
            started = True
        if started and not skipping and line.strip():
            lines.append(line)
    return lines


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
        presets = sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml"))
        groups[group] = [f"{p}*" if p == default else p for p in presets]
    if "sweep" in (config.get("hydra") or {}):
        installed = importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
        groups["hydra/launcher"] = ["basic*", *(LAUNCHERS if installed else
                                                ("(pip install smooseg[slurm] for submitit_local, "
                                                 "submitit_slurm)",))]
    return groups
