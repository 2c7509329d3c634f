"""A preprocess that ends its process on one picture size, as a native decoder fed hostile bytes
can: for the decode pool's tests, which unpickle it in their worker processes (so it imports
nothing heavy)."""

import os

from indexer.models.pixels import Preprocess

CRASH_SIZE = (13, 13)


class CrashingPreprocess:
    def __init__(self, preprocess: Preprocess):
        self.preprocess = preprocess

    def __call__(self, image):
        if image.size == CRASH_SIZE:
            os._exit(1)  # no exception, no cleanup: the process is gone
        return self.preprocess(image)
