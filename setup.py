"""Build hook only; all metadata lives in pyproject.toml.

The model card templates live in the top-level `hub_cards/` folder (the source of truth, edited there).
Wheels ship a copy inside the package as `timm_layerattn/hub_cards/`, where `timm_layerattn.hub` looks first;
editable installs and source checkouts read the top-level folder directly.
"""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

_ROOT = os.path.dirname(os.path.abspath(__file__))
_DATA_DIRS = {'hub_cards': os.path.join('timm_layerattn', 'hub_cards')}  # source folder -> location in the package


class BuildPyWithData(build_py):
    """`build_py` that also copies the top-level data folders into the built package."""

    def run(self):
        super().run()
        if self.editable_mode:
            return
        for src_dir, pkg_dir in _DATA_DIRS.items():
            src = os.path.join(_ROOT, src_dir)
            dst = os.path.join(self.build_lib, pkg_dir)
            self.mkpath(dst)
            for name in sorted(os.listdir(src)):
                if name.endswith('.md'):
                    self.copy_file(os.path.join(src, name), os.path.join(dst, name))


setup(cmdclass={'build_py': BuildPyWithData})
