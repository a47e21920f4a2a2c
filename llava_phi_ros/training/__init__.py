"""Synthetic scenes, LLaVA-format datasets, staged training and evaluation."""
