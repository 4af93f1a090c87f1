"""Decoding, Qwen frame sampling / resizing, and the patch layout of `video_to_patches`."""

from __future__ import annotations

import hashlib
import math

import av
import numpy as np
import pytest

from nsa_jax.data import load_video, probe_video, smart_nframes, smart_resize, video_to_patches
from nsa_jax.data.synthetic import CODECS, write_video
from nsa_jax.data.video import (
    CLIP_MEAN,
    CLIP_STD,
    decode_frames,
    frame_pixel_cap,
    num_video_tokens,
    patches_to_video,
    sample_indices,
)

SMALL = {"min_pixels": 28 * 28, "max_pixels": 28 * 28 * 16}


def index_frames(n: int, h: int, w: int) -> np.ndarray:
    """Frames whose mean grey level encodes the frame index (6 levels apart), plus a marker."""
    frames = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        frames[i] = 16 + 6 * i
    frames[:, : h // 4, : w // 4, 1] = 255  # top-left marker, to check orientation
    return frames


def decoded_index(frames: np.ndarray) -> np.ndarray:
    """Recovers the encoded index from the bottom-right quarter (away from the marker)."""
    h, w = frames.shape[1:3]
    return np.round((frames[:, h // 2 :, w // 2 :].mean(axis=(1, 2, 3)) - 16) / 6).astype(int)


# --------------------------------------------------------------------------- sizes and counts


def test_smart_resize_known_values() -> None:
    # 1080p at the default video cap (768 * 28 * 28): worked by hand from qwen-vl-utils.
    assert smart_resize(1080, 1920) == (560, 1008)
    assert smart_resize(224, 224, min_pixels=28 * 28, max_pixels=50176) == (224, 224)
    assert smart_resize(10, 10, min_pixels=56 * 56, max_pixels=10**6) == (56, 56)


def test_smart_resize_properties(rng: np.random.Generator) -> None:
    for _ in range(200):
        h, w = (int(x) for x in rng.integers(20, 3000, size=2))
        if max(h, w) / min(h, w) > 50:
            continue
        lo = int(rng.integers(1, 200)) * 784
        hi = lo + int(rng.integers(0, 2000)) * 784
        rh, rw = smart_resize(h, w, min_pixels=lo, max_pixels=hi)
        assert rh % 28 == 0 and rw % 28 == 0 and rh >= 28 and rw >= 28
        assert rh * rw <= max(hi, 28 * 28 * math.ceil(max(h, w) / min(h, w)))
        # aspect ratio kept to within one 28-pixel step on each side
        assert abs(rh / rw - h / w) <= (h / w) * (28 / rh + 28 / rw) + 1e-9


def test_smart_resize_equals_transformers(rng: np.random.Generator) -> None:
    # transformers' copy without torchvision (the PIL image processor); the video processor's
    # is the same code, checked on whole videos in test_data_hf_parity.py.
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        smart_resize as hf_smart_resize,
    )

    for _ in range(500):
        h, w = (int(x) for x in rng.integers(14, 4000, size=2))
        if max(h, w) / min(h, w) > 200:
            continue
        lo = int(rng.integers(1, 300)) * 784
        hi = lo + int(rng.integers(0, 3000)) * 784
        assert smart_resize(h, w, min_pixels=lo, max_pixels=hi) == hf_smart_resize(
            h, w, factor=28, min_pixels=lo, max_pixels=hi
        ), (h, w, lo, hi)


def test_smart_resize_rejects_extreme_aspect() -> None:
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 3000)


def test_smart_nframes_matches_qwen_rule() -> None:
    # 10 s at 30 fps sampled at 2 fps -> 20 frames; clamps to min/max and to even counts.
    assert smart_nframes(300, 30.0, fps=2.0) == 20
    assert smart_nframes(300, 30.0, fps=0.1) == 4  # min_frames
    assert smart_nframes(300, 30.0, fps=30.0, max_frames=101) == 100
    assert smart_nframes(7, 30.0, fps=2.0, min_frames=4) == 4
    assert smart_nframes(3, 30.0, fps=2.0) == 2  # never more than the clip has
    assert smart_nframes(300, 30.0, num_frames=11) == 12  # round half to even, like Python
    with pytest.raises(ValueError, match="cannot sample 8 frames from a clip of 5 frames: ask"):
        smart_nframes(5, 30.0, num_frames=8)
    with pytest.raises(ValueError, match="a clip of 1 frame.s.: at least 2 needed"):
        smart_nframes(1, 30.0, fps=2.0)


def test_total_pixels_budget_lowers_frame_cap() -> None:
    total = 1000 * 784
    assert frame_pixel_cap(10, total_pixels=total, max_pixels=768 * 784) == 200 * 784
    # never below 1.05 * min_pixels, however many frames
    assert frame_pixel_cap(10**6, total_pixels=total) == int(128 * 784 * 1.05)


def test_sample_indices_round_half_even() -> None:
    np.testing.assert_array_equal(sample_indices(0, 9, 4), [0, 3, 6, 9])
    np.testing.assert_array_equal(sample_indices(0, 3, 3), [0, 2, 3])  # 1.5 -> 2


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("codec", list(CODECS))
def test_each_codec_decodes_sampled_frames(tmp_path, codec: str) -> None:
    n, fps = 36, 10.0
    path = write_video(tmp_path / f"v{CODECS[codec][0]}", index_frames(n, 64, 96), fps=fps,
                       codec=codec)
    info = probe_video(path)
    assert info.num_frames == n and info.fps == pytest.approx(fps)
    video = load_video(path, fps=2.5, **SMALL)
    assert video.frames.dtype == np.uint8 and video.frames.shape[0] == 8
    assert video.frames.shape[1] % 28 == 0 and video.frames.shape[2] % 28 == 0
    want = sample_indices(0, n - 1, 8)
    np.testing.assert_allclose(video.timestamps, want / fps, atol=1e-6)
    np.testing.assert_array_equal(decoded_index(video.frames), want)
    assert video.sample_fps == pytest.approx(8 / 36 * 10)
    assert video.second_per_grid == pytest.approx(2 / (8 / 36 * 10))


# x264 takes odd sides only without chroma subsampling; the other encoders take 4:2:0.
ODD_SIZE_PIX_FMT = {"libx264": "yuv444p"}


@pytest.mark.parametrize("codec", list(CODECS))
def test_odd_size_decodes_and_resizes_to_multiples_of_28(tmp_path, codec: str) -> None:
    h, w = 97, 131
    path = write_video(tmp_path / f"odd{CODECS[codec][0]}", index_frames(8, h, w), fps=4,
                       codec=codec, pix_fmt=ODD_SIZE_PIX_FMT.get(codec))
    info = probe_video(path)
    assert (info.height, info.width) == (h, w)
    video = load_video(path, num_frames=4, min_pixels=784, max_pixels=10**6)
    assert video.frames.shape == (4, *smart_resize(h, w, min_pixels=784, max_pixels=10**6), 3)
    assert video.frames.shape[1:3] == (84, 140)
    np.testing.assert_array_equal(decoded_index(video.frames), sample_indices(0, 7, 4))


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_metadata_is_applied(tmp_path, rotation: int) -> None:
    h, w = 56, 112
    path = write_video(tmp_path / "r.mp4", index_frames(6, h, w), fps=4, rotation=rotation)
    info = probe_video(path)
    assert info.rotation == rotation
    video = load_video(path, num_frames=2, min_pixels=784, max_pixels=10**6)
    f = video.frames[0, ..., 1].astype(int)
    want = np.rot90(index_frames(1, h, w)[0, ..., 1].astype(int), k=rotation // 90)
    assert f.shape == want.shape
    # the marker (green 255) lands in the same corner as rotating the source would put it
    corners = lambda a: [a[:8, :8].mean(), a[:8, -8:].mean(), a[-8:, :8].mean(), a[-8:, -8:].mean()]  # noqa: E731
    assert int(np.argmax(corners(f))) == int(np.argmax(corners(want)))


# AVI stores no per-frame times (one rate for the whole stream), so MJPEG/AVI has no VFR case.
@pytest.mark.parametrize("codec", ["libx264", "libvpx-vp9", "mpeg4"])
def test_variable_frame_rate_timestamps(tmp_path, rng: np.random.Generator, codec: str) -> None:
    n = 30
    pts_ms = np.cumsum(np.concatenate([[0], rng.integers(40, 300, size=n - 1)]))
    path = write_video(tmp_path / f"vfr{CODECS[codec][0]}", index_frames(n, 56, 56),
                       codec=codec, pts_ms=pts_ms.tolist())
    video = load_video(path, num_frames=8, **SMALL)
    idx = sample_indices(0, n - 1, 8)
    np.testing.assert_allclose(video.timestamps, pts_ms[idx] / 1000.0, atol=2e-3)
    np.testing.assert_array_equal(decoded_index(video.frames), idx)


def test_start_end_range(tmp_path) -> None:
    path = write_video(tmp_path / "se.mp4", index_frames(36, 56, 56), fps=10)
    video = load_video(path, num_frames=4, start=1.0, end=2.5, **SMALL)
    np.testing.assert_array_equal(decoded_index(video.frames), sample_indices(10, 25, 4))
    with pytest.raises(ValueError, match="selects no frames"):
        load_video(path, start=9.0, end=10.0)


def test_the_same_synthetic_videos_are_written_byte_for_byte_every_time(tmp_path) -> None:
    """A training command writes its synthetic videos itself: the same seed must give the
    same files, or two runs of one command (a resumed one, a dense twin) see different pixels.
    x264's macroblock-tree rate control broke that on some hosts (5 of 6 videos differed)."""
    from nsa_jax.data.synthetic import SyntheticConfig, write_dataset

    digests = []
    for i in range(3):
        root = tmp_path / str(i)
        write_dataset(root, task="needle", num_videos=6, cfg=SyntheticConfig(), seed=0)
        digests.append({p.name: hashlib.md5(p.read_bytes()).hexdigest()
                        for p in sorted(root.iterdir())})
    assert len(digests[0]) == 7 and digests[0] == digests[1] == digests[2]


def test_seeking_decode_equals_sequential_decode(tmp_path, rng: np.random.Generator) -> None:
    # short GOPs so that sparse sampling seeks; compare with decoding every frame in order
    n = 120
    frames = rng.integers(0, 255, size=(n, 28, 28, 3), dtype=np.uint8)
    path = tmp_path / "seek.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=24, options={"g": "12", "crf": "30"})
        s.width, s.height, s.pix_fmt = 28, 28, "yuv420p"
        for i, f in enumerate(frames):
            fr = av.VideoFrame.from_ndarray(f, format="rgb24")
            fr.pts = i
            c.mux(s.encode(fr))
        c.mux(s.encode())
    info = probe_video(path)
    assert info.keyframe_pts.size >= n // 12
    with av.open(str(path)) as c:
        allf = np.stack([f.to_ndarray(format="rgb24", width=28, height=28, interpolation="BICUBIC")
                         for f in c.decode(video=0)])
    idx = np.sort(rng.choice(n, size=9, replace=False))
    np.testing.assert_array_equal(decode_frames(path, info, idx, (28, 28)), allf[idx])


def test_missing_and_corrupt_files_raise(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        load_video(tmp_path / "nope.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00not a video" * 100)
    with pytest.raises((av.FFmpegError, ValueError)):
        load_video(bad)


# --------------------------------------------------------------------------- patchify


def oracle_patches(frames: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Independent, loop-based statement of the Qwen2-VL row layout.

    Row for (t, by, bx, my, mx) — temporal patch, merge-block row/col, position in block —
    is the 2x14x14 cube at frames [2t:2t+2], rows y = (2*by+my)*14, cols x = (2*bx+mx)*14,
    normalised, laid out (channel, time, row, col).
    """
    f = frames.astype(np.float64) / 255.0
    if f.shape[0] % 2:
        f = np.concatenate([f, f[-1:]], 0)
    mean, std = np.asarray(CLIP_MEAN), np.asarray(CLIP_STD)
    f = (f - mean) / std
    gt, gh, gw = f.shape[0] // 2, f.shape[1] // 14, f.shape[2] // 14
    rows = []
    for t in range(gt):
        for by in range(gh // 2):
            for bx in range(gw // 2):
                for my in range(2):
                    for mx in range(2):
                        y, x = (2 * by + my) * 14, (2 * bx + mx) * 14
                        cube = f[2 * t : 2 * t + 2, y : y + 14, x : x + 14, :]  # [2,14,14,3]
                        rows.append(np.transpose(cube, (3, 0, 1, 2)).reshape(-1))
    return np.stack(rows), (gt, gh, gw)


@pytest.mark.parametrize("shape", [(4, 56, 84), (3, 28, 56), (2, 84, 28)])
def test_video_to_patches_matches_oracle(rng: np.random.Generator, shape) -> None:
    frames = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    pv, grid = video_to_patches(frames)
    want, g = oracle_patches(frames)
    assert pv.dtype == np.float32 and pv.shape == (want.shape[0], 1176)
    np.testing.assert_array_equal(grid, [g])
    np.testing.assert_allclose(pv, want, atol=1e-5)
    assert num_video_tokens(g) == pv.shape[0] // 4


def test_patches_round_trip(rng: np.random.Generator) -> None:
    frames = rng.integers(0, 256, size=(6, 56, 112, 3), dtype=np.uint8)
    pv, grid = video_to_patches(frames)
    std, mean = np.asarray(CLIP_STD) * 255, np.asarray(CLIP_MEAN) * 255
    back = patches_to_video(pv, grid[0]) * std + mean
    np.testing.assert_allclose(back, frames, atol=1e-3)


def test_video_to_patches_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="multiple of 28"):
        video_to_patches(np.zeros((2, 30, 28, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        video_to_patches(np.zeros((2, 28, 28), np.uint8))
