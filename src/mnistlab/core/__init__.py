"""mnistlab.core."""
