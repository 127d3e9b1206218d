"""Training with Lightning: the LightningModule, data module, callbacks, feature cache and train(settings).

The package itself is callable as ``smooseg.train(*overrides)`` (:func:`smooseg.api.train`): once
this package is imported it is the ``train`` attribute of ``smooseg``, so it answers that call.
"""

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *overrides):
        from smooseg.api import train

        return train(*overrides)


sys.modules[__name__].__class__ = _CallableModule
