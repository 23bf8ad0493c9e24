"""Diff pruning (Guo, Rush & Kim 2021): an L0-penalised search over dense diffs, then a fixed sparse mask."""
from fastpeft.methods.diff_pruning.config import DiffPruningConfig
from fastpeft.methods.diff_pruning.method import DiffPruningMethod
from fastpeft.methods.diff_pruning.search import l0_penalty, project_to_density

__all__ = ["DiffPruningConfig", "DiffPruningMethod", "l0_penalty", "project_to_density"]
