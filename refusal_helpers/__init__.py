"""Refusal in language models is mediated by a single direction: a small reference implementation."""
