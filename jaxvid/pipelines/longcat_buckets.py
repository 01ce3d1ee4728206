"""LongCat-Video's aspect-ratio buckets (upstream longcat_video/utils/bukcet_config.py): ratio h / w -> (h, w).

`bucket_size(height, width, resolution, scale)` picks the size i2v, continuation and refinement
generate at from the input's aspect ratio, as upstream's `get_condition_shape` does.
"""
from __future__ import annotations

__all__ = ["bucket_size"]


_BUCKETS_480P = {  # ASPECT_RATIO_627: scale factor 16 or 32
    0.26: (320, 1216), 0.31: (352, 1120), 0.38: (384, 1024), 0.43: (416, 960), 0.52: (448, 864),
    0.58: (480, 832), 0.67: (512, 768), 0.74: (544, 736), 0.86: (576, 672), 0.95: (608, 640),
    1.05: (640, 608), 1.17: (672, 576), 1.29: (704, 544), 1.35: (736, 544), 1.50: (768, 512),
    1.67: (800, 480), 1.73: (832, 480), 2.00: (896, 448), 2.31: (960, 416), 2.58: (992, 384),
    2.75: (1056, 384), 3.09: (1088, 352), 3.70: (1184, 320), 3.80: (1216, 320), 3.90: (1248, 320),
    4.00: (1280, 320),
}
_BUCKETS_720P = {  # ASPECT_RATIO_960: scale factor 16 or 32
    0.25: (480, 1920), 0.29: (512, 1792), 0.32: (544, 1696), 0.36: (576, 1600), 0.40: (608, 1504),
    0.49: (672, 1376), 0.54: (704, 1312), 0.59: (736, 1248), 0.69: (800, 1152), 0.74: (832, 1120),
    0.82: (864, 1056), 0.88: (896, 1024), 0.94: (928, 992), 1.00: (960, 960), 1.07: (992, 928),
    1.14: (1024, 896), 1.22: (1056, 864), 1.31: (1088, 832), 1.35: (1120, 832), 1.44: (1152, 800),
    1.70: (1248, 736), 2.00: (1344, 672), 2.05: (1376, 672), 2.47: (1504, 608), 2.53: (1536, 608),
    2.83: (1632, 576), 3.06: (1664, 544), 3.12: (1696, 544), 3.62: (1856, 512), 3.93: (1888, 480),
    4.00: (1920, 480),
}
_BUCKETS_720P_F64 = {  # ASPECT_RATIO_960_F64: scale factor 64 (refinement)
    0.22: (448, 2048), 0.29: (512, 1792), 0.36: (576, 1600), 0.45: (640, 1408), 0.55: (704, 1280),
    0.63: (768, 1216), 0.76: (832, 1088), 0.88: (896, 1024), 1.00: (960, 960), 1.14: (1024, 896),
    1.31: (1088, 832), 1.50: (1152, 768), 1.58: (1216, 768), 1.82: (1280, 704), 1.91: (1344, 704),
    2.20: (1408, 640), 2.30: (1472, 640), 2.67: (1536, 576), 2.89: (1664, 576), 3.62: (1856, 512),
    3.75: (1920, 512),
}
_BUCKETS = {("480p", 16): _BUCKETS_480P, ("480p", 32): _BUCKETS_480P, ("720p", 16): _BUCKETS_720P,
            ("720p", 32): _BUCKETS_720P, ("720p", 64): _BUCKETS_720P_F64}


def bucket_size(height: int, width: int, resolution: str, scale_factor_spatial: int = 16) -> tuple[int, int]:
    """Upstream `get_condition_shape`: the (h, w) bucket whose ratio h / w is closest to height / width.

    Ties go to the first bucket in the table, as upstream's stable sort does.
    """
    table = _BUCKETS.get((resolution, scale_factor_spatial))
    if table is None:
        raise ValueError(f"resolution={resolution!r} with spatial scale {scale_factor_spatial}: expected one of "
                         f"{sorted(set(_BUCKETS))} (resolution, scale)")
    if height < 1 or width < 1:
        raise ValueError(f"condition size {height}x{width}: expected positive height and width")
    ratio = height / width
    return table[min(table, key=lambda r: abs(r - ratio))]
