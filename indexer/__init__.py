"""Everything that writes an index: loading models, reading files, storing vectors and catalog."""
