"""The sympy symbols of the closed-form cost model: sequence length, head dim, element bytes, block size."""

from __future__ import annotations

import sympy as sp_

L = sp_.Symbol("L", positive=True, integer=True)
D = sp_.Symbol("D", positive=True, integer=True)
BYTES = sp_.Symbol("e", positive=True)
BM = sp_.Symbol("B_M", positive=True, integer=True)
