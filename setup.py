"""The build's one step beyond pyproject.toml: the repository's top-level ``conf/`` ships
inside the wheel as ``mnistlab/conf``, so an installed mnistlab finds its configs from any
folder (``mnistlab.config.CONF_DIR``). An editable install reads ``conf/`` in place and copies
nothing. (A ``package-dir`` entry mapping ``mnistlab.conf`` to ``conf`` would do the same for
wheels, but it turns the editable install from one ``.pth`` line into an import hook, behind
which Hydra no longer finds the plugin in ``src/hydra_plugins``.)"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONF = Path(__file__).resolve().parent / "conf"


class BuildPyWithConf(build_py):
    """``build_py``, then every yaml under ``conf/`` into ``<build>/mnistlab/conf/``."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        for yaml in sorted(CONF.rglob("*.yaml")):
            target = Path(self.build_lib, "mnistlab", "conf", yaml.relative_to(CONF))
            self.mkpath(str(target.parent))
            self.copy_file(str(yaml), str(target))


setup(cmdclass={"build_py": BuildPyWithConf})
