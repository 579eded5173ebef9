"""Catalogue of named attention patterns, written with the public DSL only.

``CATALOGUE`` maps each name (as used by ``attnc``) to its constructor; every constructor's
docstring cites its source and states its parameters and defaults.
"""

from .combiner import combiner_axial, combiner_fixed, combiner_logsparse, combiner_mixture
from .diffuser import diffuser, diffuser_heat
from .abc import abc_cluster, abc_linformer, abc_window, abc_mlp
from .sparse import (axial, bigbird, causal, document, logsparse, longformer, prefix_lm, sliding_window,
                     sparse_transformer_fixed, sparse_transformer_strided)

CATALOGUE = {
    "sliding_window": sliding_window,
    "causal": causal,
    "prefix_lm": prefix_lm,
    "document": document,
    "bigbird": bigbird,
    "longformer": longformer,
    "fixed": sparse_transformer_fixed,
    "strided": sparse_transformer_strided,
    "logsparse": logsparse,
    "axial": axial,
    "combiner_fixed": combiner_fixed,
    "combiner_logsparse": combiner_logsparse,
    "combiner_axial": combiner_axial,
    "combiner_mixture": combiner_mixture,
    "diffuser": diffuser,
    "diffuser_heat": diffuser_heat,
    "abc_mlp": abc_mlp,
    "abc_linformer": abc_linformer,
    "abc_window": abc_window,
    "abc_cluster": abc_cluster,
}


def describe(name: str) -> str:
    """First line of a catalogue entry's docstring."""
    return (CATALOGUE[name].__doc__ or "").strip().splitlines()[0]


__all__ = ["CATALOGUE", "describe"] + [f.__name__ for f in CATALOGUE.values()]
