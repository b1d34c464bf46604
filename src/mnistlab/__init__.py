"""mnistlab.

Before anything imports torch: GNU OpenMP threads that wait for a partner sleep rather than
spin (``OMP_WAIT_POLICY=PASSIVE``, read once when torch loads its OpenMP runtime). A run's
thread count is fixed by the machine and the config, not the load
(:mod:`mnistlab.processes.threads`), so that the same command gives the same numbers; spinning
threads would turn a second process on the same cores into a 200x slow-down. A value the user
set is kept."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
