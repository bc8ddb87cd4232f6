"""Shim for tools that still run setup.py: the metadata is in pyproject.toml."""

from __future__ import annotations

from setuptools import setup

setup()
