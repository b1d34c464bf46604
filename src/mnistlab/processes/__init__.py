"""mnistlab.processes."""
