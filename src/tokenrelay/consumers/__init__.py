"""Consumers: readers of the streams that never talk to the workers."""
