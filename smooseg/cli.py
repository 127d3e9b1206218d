"""Shared plumbing for the Hydra entry points: reference-style flags and one-line errors (an
unknown key answered with the key that was meant)."""

import dataclasses
import difflib
import functools
import re
import sys

from hydra.experimental.callback import Callback
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue

from smooseg.errors import SmoosegError
from smooseg.settings import CropSource, describe, field_rule
from smooseg.signals import TERMINATED_STATUS, Terminated

# Hydra's own command-line flags, passed through untouched.
_HYDRA_FLAGS = {
    "--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd", "--cfg", "-c",
    "--package", "-p", "--resolve", "--multirun", "-m", "--run", "-r", "--help", "-h",
    "--hydra-help", "--info", "-i", "--version", "--shell-completion", "-sc",
    "--experimental-rerun",
}


def translate_args(argv):
    """Turn reference-script style ``--key value`` / ``--key=value`` into Hydra's ``key=value``."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if not arg.startswith("--") or name in _HYDRA_FLAGS:
            out.append(arg)
            if name in _HYDRA_FLAGS and "=" not in arg and i + 1 < len(argv) and name in {
                "--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd",
                "--cfg", "-c", "--package", "-p", "--info", "-i", "--experimental-rerun",
            } and not argv[i + 1].startswith("-"):
                out.append(argv[i + 1])
                i += 1
        elif "=" in arg:
            out.append(arg[2:])
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out.append(f"{arg[2:]}={argv[i + 1]}")
            i += 1
        else:
            out.append(f"{arg[2:]}=true")
        i += 1
    return out


def one_line(message):
    """The user-facing line of an error message.

    A SmoosegError raised inside a DataLoader worker comes back wrapped in several lines
    ("Caught SmoosegError in DataLoader worker ... Original Traceback ..."); its own message is
    the last line. Anything else multi-line is joined into one line.
    """
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "Original Traceback" in str(message):
        return lines[-1].split("SmoosegError: ", 1)[-1]
    return " ".join(lines)


def report_errors(task):
    """Wrap a Hydra task so a user error prints one line on stderr and exits with status 2.

    User errors are SmoosegError and a required config value left unset (``???``); Ctrl-C ends
    with ``error: interrupted`` and status 130, a SIGTERM turned into :class:`Terminated` with
    its line and status 143.
    """

    @functools.wraps(task)
    def wrapped(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except SmoosegError as err:
            print(f"error: {one_line(err)}", file=sys.stderr)
            sys.exit(2)
        except MissingMandatoryValue as err:
            key = err.full_key or "a config key"
            print(f"error: config key '{key}' is required but not set; pass {key}=...", file=sys.stderr)
            sys.exit(2)
        except Terminated as err:  # SIGTERM where an entry point turned it into an exception
            print(f"error: {one_line(err) or 'stopped by SIGTERM'}", file=sys.stderr)
            sys.exit(TERMINATED_STATUS)
        except KeyboardInterrupt:  # Ctrl-C: the CRF pool has already shut its workers down
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapped


# The reference release's config keys (its training and evaluation configs) and the keys they
# became here; of several, the first one the composed config has is suggested. The reference keys
# that kept their names (res in training, seed, batch_size, max_steps, num_workers, data_dir,
# extra_clusters, hist_freq, model_paths) need no entry.
REFERENCE_RENAMED = {
    "dataset_name": ("dataset",),  # the dataset group: dataset=<name>
    "dino_patch_size": ("model.patch_size",),
    "model_type": ("model.model_type",),
    "arch": ("model.arch",),
    "dino_feat_type": ("model.feat_type",),
    "dim": ("model.dim",),
    "projection_type": ("model.projection_type",),
    "dropout": ("model.dropout",),
    "val_freq": ("val_check_interval",),
    "checkpoint_freq": ("val_check_interval",),
    "crop_type": ("dataset.train_crop_source.crop_type",),
    "crop_ratio": ("dataset.train_crop_source.ratio",),
    "loader_crop_type": ("dataset.train_crop",),
    "lr1": ("optim.lr1",),
    "lr2": ("optim.lr2",),
    "temperature": ("loss.temperature",),
    "alpha": ("loss.ema_alpha",),
    "pos_intra_shift": ("loss.pos_intra_shift",),
    "neg_inter_shift": ("loss.neg_inter_shift",),
    "pointwise": ("loss.pointwise",),
    "n_images": ("n_log_images",),
    "scalar_log_freq": ("trainer.log_every_n_steps",),
    "output_root": ("output_dir",),
    "res": ("eval_res",),  # evaluation (training keeps res)
    "run_crf": ("crf", "final_eval.crf"),  # evaluation; training's final evaluation
}
REFERENCE_WITHOUT_COUNTERPART = {
    "experiment_name": "a run is named by its folder, output_dir",
    "full_name": "a run is named by its folder, output_dir",
    "log_dir": "logs go to <output_dir>/<logger> (logger=tensorboard: <output_dir>/tensorboard)",
    "azureml_logging": "the loggers are logger=tensorboard | csv | wandb | mlflow | none",
    "n_feats": "the feature size is derived from the backbone: model.arch and model.model_type",
    "run_picie": "the PiCIE baseline is not part of this package",
    "run_prediction": "predictions are always computed (n_images saves pictures of them)",
    "dark_mode": "pictures use the data set's colour map only",
    "use_ddp": "evaluation runs in one process on one device (device=cuda:N); training uses trainer=ddp",
}
# Sections that may be null in a config; setting one of their keys then means setting the whole
# section, filled with its schema's defaults (smooseg.settings: the published five-crop set).
WHOLE_SECTIONS = {"dataset.train_crop_source": CropSource}
_MISSING = object()


def config_keys(tree, prefix=""):
    """The dotted keys of a plain nested dict (sections and their keys, depth first)."""
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        yield dotted
        if isinstance(value, dict):
            yield from config_keys(value, f"{dotted}.")


def _lookup(tree, dotted):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


def nearest_key(key, valid, cutoff=0.65):
    """The valid dotted key closest to ``key``, or None: by the last part within the same section,
    else by the better of the last parts and the whole keys, less 0.1 (another section is a bigger
    step); never a section that holds ``key``."""
    parent, _, leaf = key.rpartition(".")

    def score(candidate):
        section, _, name = candidate.rpartition(".")
        ratio = difflib.SequenceMatcher(None, leaf, name).ratio()
        if section == parent:
            return ratio
        return max(ratio, difflib.SequenceMatcher(None, key, candidate).ratio()) - 0.1

    candidates = [c for c in valid if not key.startswith(f"{c}.")]
    best = max(candidates, key=score, default=None)
    return best if best is not None and score(best) >= cutoff else None


def _override(key, value):
    """``key=value`` as a command-line word (single-quoted when the shell would mangle it)."""
    word = f"{key}={value}"
    return f"'{word}'" if any(char in str(value) for char in " []{}()*?$;&|<>'\"") else word


def _format_value(value):
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _whole_section(section, leaf, value):
    defaults = dataclasses.asdict(WHOLE_SECTIONS[section]()) if section in WHOLE_SECTIONS else {}
    return _override(section, _format_value({**defaults, leaf: value}))


def _null_section(tree, key):
    """The section above ``key`` when the config holds it as null (or empty), else None."""
    section = key.rpartition(".")[0]
    return section if section and _lookup(tree, section) in (None, {}) else None


def reference_key_message(key, value, tree):
    """The hint for a key of the reference's configs, or None when ``key`` is not one."""
    head = f"unknown config key '{key}'"
    if key in REFERENCE_WITHOUT_COUNTERPART:
        return (f"{head}: the reference's {key} has no counterpart here "
                f"({REFERENCE_WITHOUT_COUNTERPART[key]}); remove it")
    natives = REFERENCE_RENAMED.get(key)
    if natives is None:
        return None
    if natives == ("dataset",):
        return f"{head}: the reference's {key} is the dataset group here; pass {_override('dataset', value)}"
    for native in natives:
        if _lookup(tree, native) is not _MISSING:
            return f"{head}: the reference's {key} is {native} here; pass {_override(native, value)}"
    for native in natives:
        section = _null_section(tree, native)
        if section is not None:
            return (f"{head}: the reference's {key} is {native} here, and {section} is null in this "
                    f"config; pass {_whole_section(section, native.rpartition('.')[2], value)}")
    return (f"{head}: the reference's {key} is {natives[0]} in train_segmentation.py, not a setting of "
            "this script; remove it")


def unknown_key_message(key, value, tree):
    """One line for an override of a key the composed config (``tree``, a plain dict) lacks: the
    reference's name of a setting, a null section, the nearest valid key, or a Lightning argument."""
    head = f"unknown config key '{key}'"
    if "." not in key:
        hint = reference_key_message(key, value, tree)
        if hint is not None:
            return hint
    section = _null_section(tree, key)
    if section is not None:
        return (f"{head}: {section} is null in this config; set it whole: "
                f"{_whole_section(section, key.rpartition('.')[2], value)}")
    valid = [k for k in config_keys(tree) if key.startswith("hydra.") or not k.startswith("hydra")]
    near = nearest_key(key, valid)
    trainer_arg = f"+{key}={value}" if key.startswith("trainer.") else None
    if near is not None:
        extra = f"; or add a Lightning Trainer argument: {trainer_arg}" if trainer_arg else ""
        return f"{head}; did you mean {near}? (pass {_override(near, value)}{extra})"
    if trainer_arg:
        return (f"{head}; to add a Lightning Trainer argument that smooseg/configs/trainer does not set, "
                f"pass {trainer_arg}")
    return f"{head}; no setting has a similar name (--cfg job prints the composed config)"


def typed_value(key, argv, fallback):
    """The value ``key`` was given on the command line ``argv`` (a multirun's whole sweep, where
    Hydra reports one job's value), else ``fallback``."""
    found = fallback
    for word in argv or ():  # the last one counts, as in Hydra
        name, sep, value = word.partition("=")
        if sep and name.lstrip("+~") == key:
            found = value
    return found


def _bad_value_message(err, argv):
    """``key=value is not allowed: key must be ...`` for an override of the wrong type (Hydra
    checks it against the entry's schema, smooseg.settings), else None."""
    from omegaconf.errors import ValidationError

    cause = err.__cause__
    if not isinstance(cause, ValidationError) or not cause.full_key:
        return None
    node = getattr(cause, "parent_node", None)
    schema = node._get_root()._metadata.object_type if node is not None else None
    found = field_rule(schema, cause.full_key) if schema is not None else None
    if found is None:
        return None
    key = cause.full_key
    value = typed_value(key, argv, cause.value if cause.value is not None else "...")
    return f"{key}={value} is not allowed: {key} must be {describe(*found)}"


# What a command-line value may hold unquoted (Hydra's override grammar); a path with anything
# else (non-ASCII letters, ',', '[', ']', '=', spaces, quotes) has to be quoted.
_UNQUOTED = re.compile(r"[A-Za-z0-9_\-+.$%*@?|/:~\\ ]*")


def quoting_hint(override):
    """How to quote ``key=value`` when its value holds what Hydra reads as syntax, or None.

    A value in brackets is taken for a one-element list: ``'model_paths=["d[1]/m.ckpt"]'``."""
    key, sep, value = override.partition("=")
    listed = value.startswith("[") and value.endswith("]")
    inner = value[1:-1] if listed else value
    if (not sep or not value or value[:1] in "'\""
            or _UNQUOTED.fullmatch(inner)  # plain values: the syntax error is elsewhere
            or value.startswith("[") != value.endswith("]")):  # an unclosed list is no quoting matter
        return None
    quoted = f'["{inner}"]' if listed else f'"{value}"'
    return (f"a value with non-ASCII letters, ',', '[', ']', '=' or quotes in it must be quoted: "
            f"'{key.lstrip('+~')}={quoted}'")


def config_error_message(err, argv=None):
    """One line for a Hydra composition / override error (unknown key, group option or syntax).

    An unknown key is answered with what was meant: the native name of a reference config key
    (``dino_patch_size`` -> ``model.patch_size``), or the nearest valid key of the config being
    composed (``loss.temprature`` -> ``loss.temperature``), with the override to pass (its value
    as typed in ``argv``, the command-line overrides).
    """
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf import OmegaConf

    first = one_line(str(err).strip().splitlines()[0]) if str(err).strip() else type(err).__name__
    if isinstance(err, OverrideParseException):
        quote = quoting_hint(str(err.override))
        plain = "write overrides as key=value, e.g. max_steps=100 or 'model_paths=[a.ckpt,b.ckpt]'"
        return f"cannot parse the command-line override '{err.override}' ({first}); {quote or plain}"
    ambiguous = re.match(r"Ambiguous value for argument '([^']*)'", str(err))
    if ambiguous:
        key, _, value = ambiguous.group(1).partition("=")
        return (f"'{ambiguous.group(1)}': a ',' separates the values of a sweep (which needs -m); for one "
                f"value that contains a ',', quote it: '{key}=\"{value}\"'")
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options:
        group, _, name = str(err.missing_cfg_file).rpartition("/")
        if group:
            return f"unknown {group} '{name}'; choose one of {', '.join(err.options)} ({group}=<name>)"
    appended = re.match(r"Could not append to config\. An item is already at '([^']+)'", str(err))
    if appended:
        key = appended.group(1)
        return (f"{key} is a setting already: pass {_override(key, typed_value(key, argv, '...'))} "
                "(without the +)")
    bad_value = _bad_value_message(err, argv)
    if bad_value is not None:
        return bad_value
    override = re.match(r"Could not override '([^']+)'", str(err))
    if override:
        key = override.group(1)
        unknown = isinstance(err.__cause__, (ConfigAttributeError, ConfigKeyError))
        if unknown or "not in struct" in str(err.__cause__):
            line = re.search(r"To append to your config use \+(.*)", str(err))
            value = typed_value(key, argv, line.group(1).split("=", 1)[1] if line and "=" in line.group(1)
                                else "...")
            node = getattr(err.__cause__, "parent_node", None)
            tree = OmegaConf.to_container(node._get_root(), resolve=False) if node is not None else {}
            return unknown_key_message(key, value, tree)
        cause = one_line(str(err.__cause__).splitlines()[0]) if err.__cause__ else first
        return f"cannot set config key '{key}': {cause}"
    return f"{first}; check the command-line overrides"


def sweep_problem(config):
    """Why the multirun ``config`` (Hydra's, before any job) cannot work, in one line, or None:
    a swept key that does not exist, or DDP (Lightning starts each further process by running
    the command line again, ``-m`` included, which would start the whole sweep in every process)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    choices = set(config.hydra.runtime.choices)
    if any(o.is_sweep_override() and o.key_or_group in choices for o in overrides):
        return None  # a swept group changes which keys exist and how each job trains
    tree = OmegaConf.to_container(config, resolve=False)
    for o in overrides:
        if (o.is_sweep_override() and not (o.is_add() or o.is_force_add() or o.is_delete())
                and o.key_or_group not in choices and _lookup(tree, o.key_or_group) is _MISSING):
            return unknown_key_message(o.key_or_group, o.input_line.split("=", 1)[1], tree)
    if "ddp" in str(OmegaConf.select(config, "trainer.strategy", default="")) and not slurm_tasks(config):
        return ("a multirun (-m) cannot train with DDP (trainer.strategy=ddp): Lightning starts each further "
                "process by running the command line again, -m included; train the seeds as separate runs "
                "(seed=<s> output_dir=<folder>/<s>) and summarise them with eval_segmentation.py "
                "model_paths='<folder>/*/checkpoints/best-*.ckpt'")
    return None


def slurm_tasks(config):
    """Whether the multirun ``config`` submits SLURM jobs (submitit) whose processes SLURM starts
    (``hydra.launcher.tasks_per_node`` > 1), so that DDP needs no second command line."""
    from omegaconf import OmegaConf

    launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
    return launcher.endswith("SlurmLauncher") and int(OmegaConf.select(
        config, "hydra.launcher.tasks_per_node", default=1) or 1) > 1


class CheckSweep(Callback):
    """Hydra callback (``hydra.callbacks`` in ``smooseg/configs/train.yaml``): a multirun that cannot work
    (:func:`sweep_problem`, e.g. ``-m loss.temprature=0.1,0.2``, or a job whose settings are bad,
    :func:`smooseg.sweep.job_problem`, e.g. ``-m optim.lr1=1e-4,-1``) stops with one ``error:``
    line before the sweep folder is made and before any job runs (Hydra composes each job's
    config only when it launches it).
    """

    def on_multirun_start(self, config, **kwargs):
        from smooseg.sweep import job_problem

        problem = sweep_problem(config) or job_problem(config)
        if problem is not None:
            # Hydra turns a callback's exceptions into warnings: stop here, as report_errors does
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)


def _one_line_config_errors(run_and_report):
    """Wrap Hydra's ``run_and_report`` so config composition errors print one ``error:`` line."""
    from hydra.errors import ConfigCompositionException, OverrideParseException

    @functools.wraps(run_and_report)
    def wrapped(func):
        def guarded():
            try:
                return func()
            except (ConfigCompositionException, OverrideParseException) as err:
                print(f"error: {config_error_message(err, sys.argv[1:])}", file=sys.stderr)
                sys.exit(2)
            except (FileExistsError, NotADirectoryError, PermissionError) as err:  # Hydra's run folder
                print(f"error: cannot create the run folder {err.filename} ({err.strerror}); choose "
                      "another output_dir", file=sys.stderr)
                sys.exit(2)

        return run_and_report(guarded)

    wrapped.one_line_config_errors = True
    return wrapped


def prepare_argv():
    """Rewrite ``sys.argv`` in place (call before the Hydra-decorated main runs).

    Also makes Hydra report config errors (unknown key, unknown group option, bad override
    syntax) as one ``error:`` line with exit status 2, like the entry points' own errors.
    """
    sys.argv[1:] = translate_args(sys.argv[1:])
    # Hydra 1.3 has no public hook for errors raised while it composes the config (its callbacks
    # start after composition, HYDRA_FULL_ERROR only toggles the traceback), so the one function
    # hydra.main reports them through is wrapped here, and only here.
    import hydra._internal.utils as hydra_utils

    if not getattr(hydra_utils.run_and_report, "one_line_config_errors", False):
        hydra_utils.run_and_report = _one_line_config_errors(hydra_utils.run_and_report)
