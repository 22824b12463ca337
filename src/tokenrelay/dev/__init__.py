"""Local development: a private redis-server, a local model server, and the demo."""
