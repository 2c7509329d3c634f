"""Everything that writes an index: loading models, reading files, storing vectors and catalog."""

import os

# OpenMP's idle threads (FAISS's and torch's runtimes) sleep instead of spinning: spinning took
# the cores that decoding workers, ONNX Runtime (whose spinning is off too) and other queries
# needed; an IVF-PQ training beside other work used 7.6 s of CPU spinning, 3.0 s sleeping. Each
# runtime reads it when it loads, after this package; a value the user set stands.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
