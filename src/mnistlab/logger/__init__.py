"""mnistlab.logger."""
