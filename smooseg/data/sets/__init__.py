"""One module per data set, each declaring its ``SPEC`` (see :mod:`smooseg.data.registry`)."""
