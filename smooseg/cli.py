"""Shared plumbing for the Hydra entry points: reference-style flags and one-line errors."""

import functools
import sys

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


def report_errors(task):
    """Wrap a Hydra task so a SmoosegError prints one line on stderr and exits with status 2."""

    @functools.wraps(task)
    def wrapped(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except SmoosegError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapped


def prepare_argv():
    """Rewrite ``sys.argv`` in place (call before the Hydra-decorated main runs)."""
    sys.argv[1:] = translate_args(sys.argv[1:])
