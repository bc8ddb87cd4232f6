"""Shim for tools that still run setup.py: the metadata is in pyproject.toml."""

from setuptools import setup

setup()
