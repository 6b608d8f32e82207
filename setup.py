# Only here because cffi_modules is a setup() keyword; metadata lives in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["cext/build_cext.py:ffibuilder"])
