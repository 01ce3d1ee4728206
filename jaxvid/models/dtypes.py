"""The one set of dtype spellings every loader, pipeline and CLI accepts."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = ["DTYPES", "resolve_dtype"]

DTYPES: dict[str, Any] = {"bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16, "fp32": jnp.float32, "float32": jnp.float32,
                          "fp16": jnp.float16, "float16": jnp.float16}


def resolve_dtype(dtype: Any, name: str = "dtype") -> np.dtype | None:
    """None -> None (keep the stored dtype); "bf16" / "bfloat16" / "fp32" / ... or a dtype -> the jnp dtype.

    Raises ValueError naming `name` for anything else (a float dtype is required).
    """
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"{name}={dtype!r}; expected one of {sorted(DTYPES)} or a jnp dtype")
        return jnp.dtype(DTYPES[dtype])
    try:
        out = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"{name}={dtype!r}; expected one of {sorted(DTYPES)} or a jnp dtype") from None
    if not jnp.issubdtype(out, jnp.floating):
        raise ValueError(f"{name}={dtype!r}; expected a floating dtype ({sorted(DTYPES)})")
    return out
