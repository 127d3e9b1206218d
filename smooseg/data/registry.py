"""Every known data set by name: the specs of ``smooseg/data/sets/*.py`` plus any registered.

Each module in :mod:`smooseg.data.sets` declares one ``DATASET_SPEC`` (:class:`DatasetSpec`); they are
found when first asked for, so adding a data set is one module there and one YAML under
``smooseg/configs/dataset/``. :func:`register` adds a spec defined elsewhere (a test, a plug-in).
"""

import importlib
import pkgutil

from smooseg.errors import SmoosegError

_SPECS = {}


def _load_builtin():
    if _SPECS:
        return
    from smooseg.data import sets

    for module in pkgutil.iter_modules(sets.__path__):
        spec = importlib.import_module(f"{sets.__name__}.{module.name}").DATASET_SPEC
        _SPECS.setdefault(spec.name, spec)


def register(spec):
    """Make ``spec`` known by its name (replacing a spec of the same name); returns it."""
    _load_builtin()
    _SPECS[spec.name] = spec
    return spec


def unregister(name):
    """Forget a registered spec (tests clean up with it)."""
    _SPECS.pop(name, None)


def dataset_names():
    """Names of every known data set, built-in first."""
    _load_builtin()
    return tuple(_SPECS)


def find_spec(name):
    """The spec named ``name`` or one of its aliases, or None."""
    _load_builtin()
    if name in _SPECS:
        return _SPECS[name]
    return next((spec for spec in _SPECS.values() if name in spec.aliases), None)


def dataset_spec(name):
    """The spec of data set ``name``; a one-line error listing the known ones otherwise."""
    spec = find_spec(name)
    if spec is None:
        raise SmoosegError(f"unknown data set '{name}' (dataset.name={name}); choose one of "
                           f"{', '.join(dataset_names())}")
    return spec


def archive_specs():
    """``{archive stem: spec or None}`` over every spec's download archives."""
    _load_builtin()
    return {stem: spec for spec in _SPECS.values() for stem in spec.archives}
