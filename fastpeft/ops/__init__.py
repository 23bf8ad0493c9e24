"""Functional ops: each file holds its reference, its autograd Function(s) and its public entry point."""
