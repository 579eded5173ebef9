"""The one error hierarchy of attncompiler.

Every error a user can trigger derives from :class:`AttnCompilerError`; messages carry the
offending value and a hint. ``assert`` is reserved for internal invariants.
"""


class AttnCompilerError(Exception):
    """Base class of every error raised by attncompiler."""


class PatternError(AttnCompilerError, ValueError):
    """An attention pattern was declared with invalid parameters or combined illegally."""


class InputError(AttnCompilerError, ValueError):
    """Tensors passed to a compiled module or the reference have bad shapes, dtypes or values."""


class UnexpectedArgumentError(InputError, TypeError):
    """A call got keyword arguments it does not know (caught by ``except TypeError``, as Python's
    own error would be, and by ``except InputError``)."""


class LayoutError(AttnCompilerError):
    """A block layout cannot be built for the requested lengths or block sizes."""


class ScheduleError(AttnCompilerError):
    """A schedule primitive's precondition does not hold."""


class LoweringError(AttnCompilerError):
    """A pattern cannot be lowered to a program."""


class CodegenError(AttnCompilerError):
    """Generated code failed to build or import; the message names the generated file."""


class UnsupportedError(AttnCompilerError, NotImplementedError):
    """A valid request that this backend or feature does not support (yet)."""
