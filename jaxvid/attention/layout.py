"""Static description of a token sequence that holds a latent video (and maybe text)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class VideoLayout:
    """Where the video tokens sit in a [B, S, H, D] sequence.

    Video tokens are in (T, H, W) raster order, `frames * height * width` of them. `text_tokens`
    text tokens sit before them (`text_first=True`, CogVideoX) or after them.
    """

    frames: int
    height: int
    width: int
    text_tokens: int = 0
    text_first: bool = True

    def __post_init__(self) -> None:
        for name in ("frames", "height", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"VideoLayout.{name}={getattr(self, name)} must be >= 1")
        if self.text_tokens < 0:
            raise ValueError(f"VideoLayout.text_tokens={self.text_tokens} must be >= 0")

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def seq_len(self) -> int:
        return self.video_tokens + self.text_tokens
