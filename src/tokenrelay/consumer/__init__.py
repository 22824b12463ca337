"""Consumers: programs that read the streams and never talk to a worker."""
