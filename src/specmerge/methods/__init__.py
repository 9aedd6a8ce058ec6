"""Merging methods as pure functions on tensors, grouped by family, behind one registry."""

from specmerge.methods.registry import Method, Param, all_methods, get_method, register

__all__ = ["Method", "Param", "all_methods", "get_method", "register"]
