"""Package list for setuptools: everything under src/ plus the config tree conf/ as clipforge.conf
(pyproject.toml holds the metadata; packages.find cannot add a package from outside its folder)."""

from setuptools import find_packages, setup

setup(packages=[*find_packages("src"), "clipforge.conf"])
