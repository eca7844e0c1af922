"""Per-attempt workspaces and (next) their bubblewrap isolation."""
