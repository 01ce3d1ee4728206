"""Video export round trips and input validation."""
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
