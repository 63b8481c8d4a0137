"""What every service process runs on: its frozen config, errors and their gRPC status
codes, logging, the cache root's paths, dying with its parent, and building native
libraries once."""
