"""Video files in and out, with PyAV (FFmpeg's libraries; `pip install av`, in requirements.txt).

- `probe(path)`: frame rate, size and frame count of a video, decoding its first frame, so a
  file that cannot be decoded is an error naming it before any work starts.
- `read_frames(path)`: its frames as uint8 RGB arrays, upright (the stream's display rotation
  applied, as players apply it).
- `VideoWriter`: uint8 RGB frames -> an H.264 MP4 at a given frame rate, written to a temporary
  name and renamed when closed, so a killed run never leaves a half-written video.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from fractions import Fraction

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mov", ".mkv", ".m4v")
CODEC = "libx264"


class VideoError(ValueError):
    """A video that cannot be opened or decoded; the message names the file."""


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    path: str
    rate: Fraction  # frames per second
    width: int  # as displayed (rotation applied)
    height: int
    frames: int  # as the container states it (0 when it does not)


def is_video(path: str | os.PathLike) -> bool:
    return os.path.splitext(str(path))[1].lower() in VIDEO_EXTENSIONS


def _open(path):
    import av

    try:
        return av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoError(f"Cannot open video {path}: {e}") from e


def _upright(frame) -> np.ndarray:
    pixels = frame.to_ndarray(format="rgb24")
    turns = round(getattr(frame, "rotation", 0) / 90) % 4  # counter-clockwise quarter turns
    return np.ascontiguousarray(np.rot90(pixels, turns)) if turns else pixels


def probe(path: str | os.PathLike) -> VideoInfo:
    """Opens a video and decodes its first frame; VideoError naming the file otherwise."""
    import av

    with _open(path) as container:
        if not container.streams.video:
            raise VideoError(f"Cannot read video {path}: it has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate or rate <= 0:
            raise VideoError(f"Cannot read video {path}: its stream states no frame rate")
        try:
            first = next(container.decode(stream), None)
        except (av.error.FFmpegError, ValueError) as e:
            raise VideoError(f"Cannot decode video {path}: {e}") from e
        if first is None:
            raise VideoError(f"Cannot decode video {path}: it has no frames")
        height, width = _upright(first).shape[:2]
        return VideoInfo(str(path), Fraction(rate), width, height, int(stream.frames or 0))


def read_frames(path: str | os.PathLike) -> Iterator[np.ndarray]:
    """Every frame of the first video stream, uint8 RGB (H, W, 3), upright."""
    import av

    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                yield _upright(frame)
        except (av.error.FFmpegError, ValueError) as e:
            raise VideoError(f"Cannot decode video {path}: {e}") from e


class VideoWriter:
    """Writes uint8 RGB frames (all of one size) as an H.264 MP4 at `rate` frames per second.

    Odd sizes are padded by one edge pixel (H.264's 4:2:0 needs even sides). The file appears
    at `path` only when `close()` succeeds.
    """

    def __init__(self, path: str | os.PathLike, rate: Fraction, *, crf: int = 20):
        import av

        self.path = str(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        root, ext = os.path.splitext(self.path)
        self._tmp = f"{root}.tmp-{os.getpid()}{ext}"
        self._container = av.open(self._tmp, mode="w")
        self._rate = Fraction(rate)
        self._crf = crf
        self._stream = None
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        import av

        frame = np.asarray(frame, np.uint8)
        h, w = frame.shape[:2]
        if h % 2 or w % 2:
            frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        if self._stream is None:
            self._stream = self._container.add_stream(CODEC, rate=self._rate)
            self._stream.width, self._stream.height = frame.shape[1], frame.shape[0]
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"crf": str(self._crf)}
        picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
        for packet in self._stream.encode(picture):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        """Flushes the encoder and moves the finished file into place."""
        if self._stream is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
        self._container.close()
        os.replace(self._tmp, self.path)

    def abandon(self) -> None:
        """Closes and removes the temporary file (after an error)."""
        try:
            self._container.close()
        finally:
            if os.path.exists(self._tmp):
                os.remove(self._tmp)
