"""mnistlab.app."""
