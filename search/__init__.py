"""Everything that reads an index: the search engine, the CLI and the HTTP API."""
