"""The compiled memory module (ABC): the learned control parameter, and decoding token by token.

The pattern, stages, lowering and reference live in :mod:`attncompiler.families.memory`.
"""

from __future__ import annotations

import torch
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedParameter

from ..errors import InputError, PatternError
from ..dsl.pattern import check_int
from ..families.memory.pattern import ClusterControl, MLPControl, Memory
from ..program.schedule import Schedule
from ..program.inputs import check_keywords, check_qkv, default_scale
from .module import CompiledAttention

# ---------------------------------------------------------------------------------------------
# The compiled module: learned control parameter and decoding
# ---------------------------------------------------------------------------------------------

class MemoryAttention(LazyModuleMixin, CompiledAttention):
    """A compiled memory pattern: ``forward(q, k, v, scale=None, *, control=None)``.

    Holds the control's learned parameter ``control_param`` (MLP ``W [D, n]``, Linformer
    ``E [n, max_len]``, cluster centroids ``[n, D]``; none for windows). Like ``nn.LazyLinear``
    it takes its shape from the first call (or :meth:`materialize`). ``control=`` passes ABC-MLP
    logits ``[B, Hkv, Lk, n]`` instead of ``k @ W``. Decoding: ``state = attn.init_state(batch)``,
    then ``out, state = attn.step(q_t, k_t, v_t, state)`` per token, with ``O(n D)`` state per
    key/value head; stepping through a sequence reproduces the causal parallel output.
    """

    def __init__(self, pattern: Memory, backend: str = "auto", schedule: Schedule | None = None,
                 check_finite: bool = False, score_mod=None, sinks=None):
        # score_mod/sinks raise (ABC's scores are against memory slots; see runtime.edge_weights)
        super().__init__(pattern, backend, schedule, check_finite, score_mod=score_mod, sinks=sinks)
        if pattern.control.param_shape(pattern.slots, 1) is None:
            self.register_parameter("control_param", None)
        else:
            self.control_param = UninitializedParameter()

    def materialize(self, head_dim: int, device=None) -> None:
        """Create the learned parameter for ``head_dim`` (no-op when it exists)."""
        if not isinstance(self.control_param, UninitializedParameter):
            return
        shape = self.pattern.control.param_shape(self.pattern.slots, head_dim)
        self.control_param.materialize(shape, device=device, dtype=torch.float32)
        with torch.no_grad():  # logits s = k W of unit scale; E sums to unit scale at max_len
            std = {MLPControl: head_dim ** -0.5, ClusterControl: 1.0}.get(type(self.pattern.control), shape[-1] ** -0.5)
            self.control_param.normal_(0.0, std)

    def initialize_parameters(self, q, k, v, *args, **kwargs) -> None:  # LazyModuleMixin hook
        # Validate first: a rejected call must not fix the parameter's shape.
        dims = check_qkv(q, k, v, check_finite=False)
        self.materialize(dims.head_dim, k.device)

    def forward(self, q, k, v, scale: float | None = None, *, return_lse: bool = False, control=None,
                **unexpected):
        """``out`` (and ``lse``) as :meth:`CompiledAttention.forward`; ``control``: ABC-MLP logits."""
        self.check_call_keywords("forward", unexpected)
        inputs = {} if control is None else {"control": control}
        if "param:control" in self.program.call_inputs():
            inputs["param:control"] = self.control_param
        return super().forward(q, k, v, scale, return_lse=return_lse, **inputs)

    def reference(self, q, k, v, scale: float | None = None, control=None, **kwargs):
        """The float64 oracle with this module's parameter (and caller ``control`` logits)."""
        from ..program.reference import reference

        check_keywords("MemoryAttention.reference", kwargs, ("scale", "control", "return_lse"))
        dims = check_qkv(q, k, v, check_finite=False)
        self.materialize(dims.head_dim, k.device)
        param = None if self.control_param is None else self.control_param.detach()
        return reference(self.pattern, q, k, v, scale, param=param, control=control, **kwargs)

    def init_state(self, batch: int, **unexpected):
        """An empty decoding state for ``batch`` sequences (its tensors appear at the first step)."""
        from ..codegen.pytorch.memory import DecodeState

        check_keywords("MemoryAttention.init_state", unexpected, ())
        if not self.pattern.is_causal:
            raise PatternError(f"step-by-step decoding needs a causal memory; {self.pattern!r} is bidirectional")
        return DecodeState(check_int("batch", batch, 1))

    def step(self, q_t, k_t, v_t, state, scale: float | None = None, *, control=None, **unexpected):
        """Attend one new token: ``q_t [B, H, 1, D]``, ``k_t, v_t [B, Hkv, 1, *]`` -> ``(out, state)``."""
        from ..codegen.pytorch.memory import DecodeState, decode_step

        check_keywords("MemoryAttention.step", unexpected, ("scale", "control"))
        if not isinstance(state, DecodeState):
            raise InputError(f"state must come from attn.init_state(batch) or the previous step, got "
                             f"{type(state).__name__}")
        dims = check_qkv(q_t, k_t, v_t, check_finite=self.check_finite)
        _check_state_matches(state, dims)
        self.materialize(dims.head_dim, k_t.device)
        out, state = decode_step(self.pattern, self.control_param, q_t, k_t, v_t, state,
                                 default_scale(dims.head_dim, scale), control)
        return out.to(q_t.dtype), state


def _check_state_matches(state, dims) -> None:
    """The state's tensors (after a first step) must fit the new token's heads and widths."""
    if state.memory is None:
        return
    B, Hkv, _, F = state.memory.shape
    if (B, Hkv) != (dims.batch, dims.kv_heads) or F != dims.head_dim + dims.v_dim + 1:
        raise InputError(f"the decoding state holds [batch, kv_heads] = {[B, Hkv]} and {F} features per slot, "
                         f"but the token has {[dims.batch, dims.kv_heads]}, head_dim {dims.head_dim}, "
                         f"v_dim {dims.v_dim}; start a new state with init_state")
