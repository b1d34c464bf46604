"""mnistlab.engine."""
