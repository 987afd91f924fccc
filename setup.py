"""Build glue: ship the top-level ``kernels/`` folder as ``sftkey.kernels``.

A top-level package named ``kernels`` would shadow the Hugging Face ``kernels``
distribution that ``transformers`` imports, so ``kernels/`` has no ``__init__.py``
(a namespace portion loses to any installed package of that name, even from the
repository's root) and is never installed under that name: ``package_dir`` maps it
to ``sftkey.kernels`` in a wheel, and the link ``sftkey/kernels -> ../kernels`` gives
a source tree (an editable install, a second worktree) the same import name.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["sftkey", "sftkey.*"]) + ["sftkey.kernels"]
setup(packages=packages, package_dir={"sftkey.kernels": "kernels"}, package_data={"sftkey.kernels": ["verified.json"]})
