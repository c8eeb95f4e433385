"""Algorithms: subclasses of titan_rl.algorithm.Algorithm, chosen by `algorithm.path` in YAML.

Every Algorithm subclass defined in a module of this package gets the contract tests in
tests/test_algorithms.py without any list to edit.
"""
