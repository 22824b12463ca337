"""The stream protocol: every Redis key, the typed entries, and how streams are written and read."""
