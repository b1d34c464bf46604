"""mnistlab.results."""
