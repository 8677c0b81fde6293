"""One-line reasons for errors from other libraries, for messages that name a file or a key.

Errors from TensorStore, transformers, tokenizers (Rust) and safetensors can run to pages;
the messages jaxunlearn raises quote only :func:`reason` of them: the first line, joined with
the next when it ends in a colon, without TensorStore's JSON spec, at most ``limit`` characters.

>>> reason(ValueError("Validation error for field 'x':\\n    TypeError: not an int\\nmore"))
"Validation error for field 'x': TypeError: not an int"
"""

from __future__ import annotations

__all__ = ["reason"]


def reason(exc: BaseException, limit: int = 300, *, innermost: bool = False) -> str:
    """A one-line reason for ``exc``.

    Args:
      exc: the exception.
      limit: at most this many characters (``...`` marks a cut).
      innermost: take the innermost error of the chain a traceback would print
        (``__cause__``, else an unsuppressed ``__context__``) and prefix its type name:
        TensorStore wraps the useful sentence (``OUT_OF_RANGE: Error reading ...``) in outer errors.

    Returns:
      The reason, one line.
    """
    inner = exc
    if innermost:
        seen = {id(exc)}
        while True:
            nxt = inner.__cause__ if inner.__cause__ is not None else (
                None if inner.__suppress_context__ else inner.__context__)
            if nxt is None or id(nxt) in seen:
                break
            seen.add(id(nxt))
            inner = nxt
    lines = [ln.strip() for ln in str(inner).splitlines() if ln.strip()] or [type(inner).__name__]
    text = lines.pop(0)
    while text.endswith(":") and lines:  # "Validation error for field 'x':" / "    TypeError: ..."
        text += " " + lines.pop(0)
    text = text.split(" [tensorstore_spec", 1)[0].split(" See full TensorStore details", 1)[0]
    if innermost and not text.startswith(type(inner).__name__):
        text = f"{type(inner).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
