"""Frames <-> arrays and video export (mp4 through imageio-ffmpeg, gif as the fallback)."""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".gif")


def to_uint8_frames(video: np.ndarray, *, value_range: tuple[float, float] = (-1.0, 1.0),
                    rounding: str = "round") -> np.ndarray:
    """Float frames [..., H, W, C] in `value_range` ((-1, 1) or (0, 1)) -> uint8, the one converter.

    Values are mapped to [0, 1] (x / 2 + 0.5 for (-1, 1)), clipped, times 255, then rounded
    (rounding="round": diffusers' and torchvision's PIL output) or truncated ("truncate": LongCat
    upstream's `(x * 255).astype(np.uint8)`).
    """
    video = np.asarray(video, dtype=np.float32)
    if tuple(value_range) not in ((-1.0, 1.0), (0.0, 1.0)):
        raise ValueError(f"value_range={value_range!r}; expected (-1, 1) or (0, 1)")
    if rounding not in ("round", "truncate"):
        raise ValueError(f"rounding={rounding!r}; expected 'round' or 'truncate'")
    x = video / np.float32(2.0) + np.float32(0.5) if value_range[0] == -1.0 else video
    x = np.clip(x, np.float32(0.0), np.float32(1.0)) * np.float32(255.0)
    return (np.round(x) if rounding == "round" else x).astype(np.uint8)


def _has_ffmpeg() -> bool:
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
        return True
    except (ImportError, RuntimeError, OSError):
        return False


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3):
        raise ValueError(f"frames: expected uint8 [F, H, W, 3], got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames: expected dtype uint8, got {frames.dtype} (use to_uint8_frames)")
    return frames


def check_output(path: str | os.PathLike, fps: int, *, names: tuple[str, str] = ("path", "fps")) -> Path:
    """Raise ValueError unless `path` ends in .mp4 / .gif and `fps` is a positive int; returns the path.

    The CLIs call it before generating, so a bad file name does not waste a run; `names` are the
    argument names the error uses (e.g. the CLI's "--output", "--fps").
    """
    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"{names[0]}={str(path)!r}: unsupported video extension {path.suffix!r}; expected one of "
                         f"{VIDEO_SUFFIXES}")
    if not isinstance(fps, (int, np.integer)) or isinstance(fps, bool) or fps < 1:
        raise ValueError(f"{names[1]}={fps!r}; expected a positive int")
    return path


def save(frames: np.ndarray, path: str | os.PathLike, fps: int = 8) -> Path:
    """Write uint8 frames [F, H, W, 3] to `path` (.mp4 via ffmpeg, or .gif).

    If an mp4 cannot be written (no ffmpeg backend), a .gif beside it is written instead and its
    path returned, with a warning.
    """
    import imageio.v2 as imageio

    path = check_output(path, fps)
    frames = _check_frames(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".mp4" and not _has_ffmpeg():
        gif = path.with_suffix(".gif")
        log.warning("no ffmpeg for mp4 (pip install imageio-ffmpeg); writing %s instead", gif)
        path = gif
    if path.suffix.lower() == ".mp4":
        # yuv420p needs even sizes: pad odd ones by one edge row/column rather than rescaling.
        ph, pw = frames.shape[1] % 2, frames.shape[2] % 2
        even = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge") if ph or pw else frames
        try:
            with warnings.catch_warnings():
                # imageio-ffmpeg forks only to exec ffmpeg at once; JAX's fork warning does not apply.
                warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
                with imageio.get_writer(path, format="FFMPEG", fps=fps, codec="libx264", quality=8,
                                        macro_block_size=1) as w:
                    for f in even:
                        w.append_data(f)
            if path.stat().st_size == 0:
                raise RuntimeError("ffmpeg wrote an empty file")
            return path
        except (ImportError, RuntimeError, OSError, ValueError) as e:
            gif = path.with_suffix(".gif")
            log.warning("mp4 export failed (%s); writing %s instead", e, gif)
            path = gif
    imageio.mimsave(path, list(frames), duration=1000 / fps, loop=0)
    return path


def _read_error(path: str | os.PathLike, what: str, error: Exception) -> ValueError:
    reason = (str(error).splitlines() or [type(error).__name__])[0]
    return ValueError(f"path={str(path)!r}: cannot read it as {what} ({reason})")


def load(path: str | os.PathLike) -> np.ndarray:
    """Read a video or gif into uint8 [F, H, W, 3]; ValueError naming the path if it is unreadable."""
    import imageio.v2 as imageio

    try:
        frames = imageio.mimread(path, memtest=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise _read_error(path, "a video", e) from None
    if not frames:
        raise ValueError(f"path={str(path)!r}: the video has no frames")
    return np.stack([_rgb(np.asarray(f)) for f in frames]).astype(np.uint8)


def _rgb(img: np.ndarray) -> np.ndarray:
    """[H, W] grey or [H, W, 3 / 4] -> [H, W, 3]."""
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return img[..., :3]


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as uint8 [H, W, 3]; ValueError naming the path if it is unreadable."""
    import imageio.v2 as imageio

    try:
        img = np.asarray(imageio.imread(path))
    except (OSError, ValueError, RuntimeError) as e:
        raise _read_error(path, "an image", e) from None
    return _rgb(img).astype(np.uint8)
