"""Block masks and BSA selections to PNG, for notebooks and docs (matplotlib, imported lazily)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["render_block_mask", "render_selection"]


def render_block_mask(mask, path: str | Path, *, title: str | None = None, dpi: int = 120) -> Path:
    """Save a bool block mask [n_q, n_k] as a PNG (white = attended, density in the title)."""
    from matplotlib.figure import Figure  # lazy: plotting is optional and slow to import

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"render_block_mask: mask.shape={mask.shape}; expected [n_q_blocks, n_k_blocks]")
    fig = Figure(figsize=(5, 5 * mask.shape[0] / max(mask.shape[1], 1) + 0.4))
    ax = fig.add_subplot()
    ax.imshow(mask.astype(np.uint8), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    heading = f"density {mask.mean():.3f}"
    ax.set_title(f"{title}: {heading}" if title else heading)
    ax.set_xlabel("key block")
    ax.set_ylabel("query block")
    path = Path(path)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def render_selection(kv_indices, kv_counts, num_kv_blocks: int, path: str | Path, *, batch: int = 0,
                     head: int = 0, title: str | None = None, dpi: int = 120) -> Path:
    """Save one (batch, head) of kernel index tables [B|1, H|1, n_q, M] / [B|1, H|1, n_q] as a PNG."""
    from pallas_kernels.reference import indices_to_block_mask

    indices = np.asarray(kv_indices)
    counts = np.asarray(kv_counts)
    if indices.ndim != 4 or counts.shape != indices.shape[:3]:
        raise ValueError(
            f"render_selection: kv_indices.shape={indices.shape}, kv_counts.shape={counts.shape}; "
            "expected [B, H, n_q, M] and [B, H, n_q]")
    b = 0 if indices.shape[0] == 1 else batch
    h = 0 if indices.shape[1] == 1 else head
    mask = indices_to_block_mask(indices[b, h], counts[b, h], num_kv_blocks)
    return render_block_mask(mask, path, title=title or f"batch {batch}, head {head}", dpi=dpi)
