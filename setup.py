"""Build glue: ship the top-level ``kernels/`` folder as ``sftkey.kernels``.

A top-level module named ``kernels`` would shadow the Hugging Face ``kernels``
distribution that ``transformers`` imports, so it is never installed under
that name.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["sftkey", "sftkey.*"]) + ["sftkey.kernels"]
setup(packages=packages, package_dir={"sftkey.kernels": "kernels"})
