"""mnistlab.bn."""
