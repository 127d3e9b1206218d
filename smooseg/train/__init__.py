"""Training with Lightning: the LightningModule, data module, callbacks, feature cache and train(settings).

The package itself is callable as ``smooseg.train(settings)`` (:func:`smooseg.api.train`): once
this package is imported, Python makes it the ``train`` attribute of ``smooseg``, so it answers
that call rather than hiding the function.
"""

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *args):
        from smooseg.api import train

        return train(*args)


sys.modules[__name__].__class__ = _CallableModule
