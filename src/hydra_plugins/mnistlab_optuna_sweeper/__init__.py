"""mnistlab's Optuna sweeper for Hydra (``hydra/sweeper=optuna``): Hydra finds it by scanning
the ``hydra_plugins`` namespace. The search itself is :mod:`mnistlab.sweeps.search`."""
