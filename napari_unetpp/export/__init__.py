"""Sharing a model: bioimage.io packages of a pruned level."""
