"""Shared plumbing for the Hydra entry points: reference-style flags and one-line errors."""

import functools
import re
import sys

from omegaconf.errors import MissingMandatoryValue

from smooseg.errors import SmoosegError

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

    User errors are SmoosegError and a required config value left unset (``???``).
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

    return wrapped


def config_error_message(err):
    """One line for a Hydra composition / override error (unknown key, group option or syntax)."""
    from hydra.errors import MissingConfigException, OverrideParseException

    first = one_line(str(err).strip().splitlines()[0]) if str(err).strip() else type(err).__name__
    if isinstance(err, OverrideParseException):
        return (f"cannot parse the command-line override '{err.override}' ({first}); write "
                "overrides as key=value, e.g. max_steps=100 or 'model_paths=[a.ckpt,b.ckpt]'")
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options:
        group, _, name = str(err.missing_cfg_file).rpartition("/")
        if group:
            return f"unknown {group} '{name}'; choose one of {', '.join(err.options)} ({group}=<name>)"
    override = re.match(r"Could not override '([^']+)'", str(err))
    if override:
        key = override.group(1)
        if "not in struct" in str(err.__cause__):
            return (f"unknown config key '{key}'; check the spelling (--cfg job lists the valid keys) "
                    f"or add a new key with +{key}=...")
        cause = one_line(str(err.__cause__).splitlines()[0]) if err.__cause__ else first
        return f"cannot set config key '{key}': {cause}"
    return f"{first}; check the command-line overrides"


def _one_line_config_errors(run_and_report):
    """Wrap Hydra's ``run_and_report`` so config composition errors print one ``error:`` line."""
    from hydra.errors import ConfigCompositionException, OverrideParseException

    @functools.wraps(run_and_report)
    def wrapped(func):
        def guarded():
            try:
                return func()
            except (ConfigCompositionException, OverrideParseException) as err:
                print(f"error: {config_error_message(err)}", file=sys.stderr)
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
