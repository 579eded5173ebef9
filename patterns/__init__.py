"""Catalogue of named attention patterns, written with the public DSL only."""
