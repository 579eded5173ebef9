"""Checkpoints of a :class:`~attncompiler.nn.TransformerStack`: config and weights in a file loadable with
``torch.load(weights_only=True)``; patterns stored as their ``repr`` and rebuilt by the safe DSL parser."""

from __future__ import annotations

import pickle
from typing import Mapping

import torch

from ..dsl.pattern import Pattern
from ..errors import InputError
from .stack import TransformerStack


CHECKPOINT_FORMAT = "attncompiler.nn.TransformerStack/1"

def parse_pattern(code: str) -> Pattern:
    """Rebuild a checkpoint's pattern from its ``repr`` with the safe DSL parser (never ``eval``:
    a checkpoint is untrusted input). See :func:`attncompiler.patterns.text.parse_pattern`."""
    from ..patterns.text import parse_pattern as parse

    try:
        return parse(code)
    except InputError as e:
        raise InputError(f"cannot rebuild the pattern {str(code)[:200]!r} from its code: {e}") from None

def save_checkpoint(stack: TransformerStack, path, **extra) -> None:
    """Write ``stack``'s config and weights (loadable with ``torch.load(weights_only=True)``).

    Patterns are stored as their ``repr`` and read back by the safe DSL parser, so every layer's
    pattern is checked to rebuild from its text before anything is written.

    Raises:
        InputError: a layer whose pattern has no text form (an opaque ``ac.mask(fn)``, a traced
            mask reading a tensor) or whose text does not rebuild it.
    """
    cfg = stack.config()
    for layer, (p, code) in enumerate(zip(stack.patterns, cfg["patterns"])):
        try:
            back = parse_pattern(code)
        except InputError as e:
            raise InputError(f"layer {layer}'s pattern {p!r} cannot be saved: it cannot be stored as text ({e}); "
                             "use a traceable mask_mod or a DSL/catalogue pattern") from None
        if back != p:
            raise InputError(f"layer {layer}'s pattern {p!r} cannot be saved: its code rebuilds {back!r}, "
                             "a different pattern")
    torch.save({"format": CHECKPOINT_FORMAT, "config": cfg, "state_dict": stack.state_dict(), "extra": extra}, path)

def load_checkpoint(path, *, backend: str = "auto") -> TransformerStack:
    """Rebuild a :class:`TransformerStack` written by :func:`save_checkpoint`.

    Safe on untrusted files: the file is read with ``torch.load(weights_only=True)`` (tensors and
    plain containers only) and patterns are parsed as DSL text, never evaluated.

    Raises:
        InputError: the file is not a readable checkpoint, or its config or patterns are malformed.
    """
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise InputError(f"cannot read checkpoint {str(path)!r}: {e}") from e
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{str(path)!r} is not an attncompiler.nn checkpoint (expected format {CHECKPOINT_FORMAT!r}); "
                         "write one with attncompiler.nn.save_checkpoint(stack, path)")
    cfg = ck.get("config")
    codes = cfg.get("patterns") if isinstance(cfg, dict) else None
    if not isinstance(codes, list) or not all(isinstance(c, str) for c in codes) or not isinstance(
            ck.get("state_dict"), Mapping):
        raise InputError(f"checkpoint {str(path)!r} is malformed: it needs a config with a list of pattern strings "
                         "and a state_dict; write it with attncompiler.nn.save_checkpoint(stack, path)")
    cfg = dict(cfg)
    patterns = [parse_pattern(c) for c in cfg.pop("patterns")]
    try:
        reuse = {int(k): {int(h): int(s) for h, s in v.items()} for k, v in cfg.pop("reuse").items()}
        stack = TransformerStack(cfg.pop("d_model"), cfg.pop("num_heads"), patterns, reuse=reuse, backend=backend,
                                 **cfg)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise InputError(f"checkpoint {str(path)!r} has a malformed config ({type(e).__name__}: {e}); "
                         "write it with attncompiler.nn.save_checkpoint(stack, path)") from None
    try:
        stack.load_state_dict(ck["state_dict"])
    except (RuntimeError, TypeError) as e:
        raise InputError(f"checkpoint {str(path)!r}: weights do not fit its config: {e}") from None
    return stack
