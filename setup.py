"""Ship the Hydra configs: a built package gets a copy of conf/ as lightning_prune/conf.

conf/ at the root of the repository stays the only copy in the source tree; an editable install reads it
there (see lightning_prune.cli.config_dir). Everything else is declared in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONFIGS = Path(__file__).resolve().parent / "conf"


class BuildWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            shutil.copytree(CONFIGS, Path(self.build_lib) / "lightning_prune" / "conf", dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildWithConfigs})
