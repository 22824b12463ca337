"""The worker: an RQ worker that runs generations and streams their tokens into Redis."""
