"""mnistlab.sweeps."""
