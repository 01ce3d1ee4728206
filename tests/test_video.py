"""Video export round trips and input validation."""
import os

import numpy as np
import pytest

from jaxvid import video


def _frames(f=4, h=16, w=24, seed=0):
    rng = np.random.default_rng(seed)
    # smooth gradients survive lossy codecs well enough to compare against
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1)
    return np.stack([np.roll(base, i, axis=1) for i in range(f)]).astype(np.uint8) + rng.integers(0, 2, (f, h, w, 3), dtype=np.uint8)


def test_to_uint8_frames_maps_range():
    out = video.to_uint8_frames(np.array([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 4, 1).repeat(3, -1))
    np.testing.assert_array_equal(out[0, 0, :, 0], [0, 128, 255, 255])


@pytest.mark.parametrize("ext", [".mp4", ".gif"])
def test_save_and_load_round_trip(tmp_path, ext):
    frames = _frames()
    path = video.save(frames, tmp_path / f"out{ext}", fps=8)
    back = video.load(path)
    assert back.shape == frames.shape
    assert np.abs(back.astype(np.int32) - frames).mean() < 12


def test_odd_sizes_are_padded_for_mp4(tmp_path):
    frames = _frames(h=15, w=21)
    back = video.load(video.save(frames, tmp_path / "odd.mp4"))
    assert back.shape[1:3] == (16, 22)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="frames"):
        video.save(np.zeros((4, 8, 8), np.uint8), tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="uint8"):
        video.save(np.zeros((2, 8, 8, 3), np.float32), tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="extension"):
        video.save(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "x.avi")
    with pytest.raises(ValueError, match="fps=0"):
        video.save(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "x.gif", fps=0)
    not_media = tmp_path / "not_an_image.png"
    not_media.write_text("hello")
    with pytest.raises(ValueError, match="not_an_image.png'.*cannot read it as an image"):
        video.load_image(not_media)
    with pytest.raises(ValueError, match="cannot read it as a video"):
        video.load(not_media)



def test_mp4_falls_back_to_gif_without_ffmpeg(tmp_path, monkeypatch):
    monkeypatch.setattr(video, "_has_ffmpeg", lambda: False)
    path = video.save(_frames(), tmp_path / "out.mp4")
    assert path.suffix == ".gif" and path.exists()
    assert video.load(path).shape == _frames().shape


_WRITE_UNDER_LIMIT = """
import resource, signal, sys
import os

import numpy as np
from jaxvid import video
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
frames = np.random.default_rng(0).integers(0, 255, (12, 48, 64, 3), dtype=np.uint8)
video.save(frames, sys.argv[1], fps=8)
"""


@pytest.mark.parametrize("name", ["out.mp4", "out.gif"])
def test_failed_write_exits_nonzero_and_leaves_no_file(tmp_path, name):
    """A real short write that runs out of space (RLIMIT_FSIZE) in a subprocess: non-zero exit, an
    error naming the path, no partial file, and a file already at the target left as it was."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out_dir = tmp_path / "videos"
    out_dir.mkdir()
    old = out_dir / name
    old.write_bytes(b"an older video")
    result = subprocess.run([sys.executable, "-c", _WRITE_UNDER_LIMIT, str(old), "4096"], cwd=repo,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(repo)})
    assert result.returncode != 0
    assert "could not write the video" in result.stderr and "no file was written" in result.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == [name]
    assert old.read_bytes() == b"an older video"
    # The same write with room succeeds and replaces the old file.
    ok = subprocess.run([sys.executable, "-c", _WRITE_UNDER_LIMIT, str(old), str(1 << 30)], cwd=repo,
                        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(repo)})
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == [name]
    assert video.load(old).shape == (12, 48, 64, 3)
