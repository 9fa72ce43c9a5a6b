"""Utilities shared by training and sampling: persistence, distribution, statistics."""
