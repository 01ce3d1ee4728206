"""Frames <-> arrays and video export (mp4 through imageio-ffmpeg, gif as the fallback)."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import tempfile
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
    """Write uint8 frames [F, H, W, 3] to `path` (.mp4 via ffmpeg, or .gif); returns the path written.

    The file appears whole or not at all: frames go to a temp file beside the target, the writer's
    exit status is checked, and only then is the temp file renamed over `path`. If an mp4 cannot
    be written (no ffmpeg, or ffmpeg fails), a .gif beside it is written the same way instead, with
    a warning. If that fails too (disk full, no permission) OSError is raised and no file is left.
    """
    path = check_output(path, fps)
    frames = _check_frames(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    mp4_error: Exception | None = None
    if path.suffix.lower() == ".mp4":
        if _has_ffmpeg():
            try:
                _write_atomically(path, lambda tmp: _write_mp4(frames, tmp, fps))
                return path
            except OSError as e:
                mp4_error = e
                log.warning("mp4 export failed (%s); writing %s instead", _first_line(e), path.with_suffix(".gif"))
        else:
            log.warning("no ffmpeg for mp4 (pip install imageio-ffmpeg); writing %s instead", path.with_suffix(".gif"))
        path = path.with_suffix(".gif")
    try:
        _write_atomically(path, lambda tmp: _write_gif(frames, tmp, fps))
    except OSError as e:
        before = f"; mp4: {_first_line(mp4_error)}" if mp4_error is not None else ""
        raise OSError(f"path={str(path)!r}: could not write the video ({_first_line(e)}{before}); "
                      "no file was written") from e
    return path


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _write_atomically(path: Path, write) -> None:
    """Call write(tmp) on a temp file beside `path` (same suffix), then rename it to `path`."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        if tmp.stat().st_size == 0:
            raise OSError("the writer produced an empty file")
        tmp.chmod(0o666 & ~_umask())  # mkstemp makes 0600; a video should read like any new file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_mp4(frames: np.ndarray, path: Path, fps: int) -> None:
    """H.264 in yuv420p through the ffmpeg binary of imageio-ffmpeg; OSError unless ffmpeg exits 0.

    (imageio's writer does not check ffmpeg's exit status, so a full disk went unnoticed.)
    """
    import imageio_ffmpeg

    # yuv420p needs even sizes: pad odd ones by one edge row/column rather than rescaling.
    ph, pw = frames.shape[1] % 2, frames.shape[2] % 2
    even = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge") if ph or pw else frames
    _, height, width, channels = even.shape
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error",
        "-f", "rawvideo", "-pix_fmt", "rgb24" if channels == 3 else "gray", "-s", f"{width}x{height}",
        "-r", str(fps), "-i", "-",
        "-an", "-vcodec", "libx264", "-pix_fmt", "yuv420p", "-crf", "10",  # imageio's quality=8
        "-r", str(fps), "-f", "mp4", str(path),
    ]
    with tempfile.TemporaryFile() as err, warnings.catch_warnings():
        # The child only execs ffmpeg; JAX's fork warning does not apply.
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
        try:
            for frame in even:
                proc.stdin.write(np.ascontiguousarray(frame).tobytes())
        except OSError:
            pass  # ffmpeg died (its exit status and message say why)
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass
            code = proc.wait()
        if code != 0:
            err.seek(0)
            message = err.read().decode(errors="replace").strip()
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
            raise OSError(f"ffmpeg {how}" + (f": {message}" if message else ""))


def _write_gif(frames: np.ndarray, path: Path, fps: int) -> None:
    from PIL import Image  # imageio's GIF writer is Pillow; called directly, a failed write raises once

    images = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in frames]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=1000 / fps, loop=0)


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
