"""The producer: requests and their checks, submitting them (one or a batch), and job handles."""
