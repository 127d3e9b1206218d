"""One module per data set, each declaring its ``DATASET_SPEC`` (see :mod:`smooseg.data.registry`)."""
