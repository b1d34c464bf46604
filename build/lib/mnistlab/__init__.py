"""mnistlab."""
