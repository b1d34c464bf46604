"""mnistlab's stacked launcher for Hydra (``hydra/launcher=stacked``): Hydra finds it by
scanning the ``hydra_plugins`` namespace. The launcher itself is :mod:`mnistlab.sweeps.stacking`."""
