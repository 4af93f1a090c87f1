"""grain pipeline: annotation formats, skip-and-count, token budget, buckets, packing, resume."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
import signal
import time
from pathlib import Path

import chex
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from data_helpers import qwen_tokenizer

from nsa_jax.data import synthetic as S
from nsa_jax.data import video as V
from nsa_jax.data.annotations import read_annotations, resolve_video
from nsa_jax.data.config import PRESETS, VIDEONSA_36K, VIDEONSA_128K, DataConfig
from nsa_jax.data.pipeline import BlockShard, make_dataset, pipeline_stats
from nsa_jax.data.processor import IGNORE, VIDEO_PAD
from nsa_jax.data.stages import NoUsableSamples, Prepare, Skipped, VideoCache, plan_frames
from pallas_kernels.numerics import round_up

NOSHARD = grain.sharding.NoSharding()
SMALL_VIDEO = S.SyntheticConfig(num_frames=48, height=56, width=84, fps=8.0, event_frames=3)


def small_cfg(root, **kw) -> DataConfig:
    base = dict(fps=2.0, min_pixels=784, max_pixels=784 * 6, max_tokens=1024,
                bucket_lengths=(256, 512, 1024), video_roots=(str(root),), seed=3)
    return DataConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def counting(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("counting")
    ann = S.write_dataset(root, task="counting", num_videos=6, cfg=SMALL_VIDEO, seed=11)
    return ann, str(root)


# --------------------------------------------------------------------------- annotations


def test_reads_llava_json_and_swift_jsonl(tmp_path) -> None:
    llava = [{"video": "a.mp4", "conversations": [
        {"from": "human", "value": "<video>\nQ1"}, {"from": "gpt", "value": "A1"}]}]
    (tmp_path / "l.json").write_text(json.dumps(llava, indent=2))
    swift = {"messages": [{"role": "user", "content": "<video>Q2"},
                          {"role": "assistant", "content": "A2"}], "videos": ["b.mp4"],
             "video_start": 1.5}
    (tmp_path / "s.jsonl").write_text("\n" + json.dumps(swift) + "\n")
    recs = read_annotations([tmp_path / "l.json", tmp_path / "s.jsonl"])
    assert [r["videos"] for r in recs] == [["a.mp4"], ["b.mp4"]]
    assert recs[0]["messages"][1] == {"role": "assistant", "content": "A1"}
    assert recs[1]["video_start"] == 1.5
    assert recs[1]["source"].endswith("s.jsonl:2")


def test_malformed_jsonl_line_fails_fast_with_file_and_line(tmp_path) -> None:
    good = json.dumps({"video": "a.mp4", "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
    p = tmp_path / "bad.jsonl"
    p.write_text(good + "\n" + good + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: invalid JSON"):
        read_annotations(p)
    p.write_text(good + "\n" + json.dumps({"video": "a.mp4", "conversations": [
        {"from": "human", "value": "q"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed annotation: no non-empty"):
        read_annotations(p)


def test_malformed_json_array_record_names_its_line(tmp_path) -> None:
    recs = [{"video": "a.mp4", "conversations": [{"from": "human", "value": "q"},
                                                 {"from": "gpt", "value": "a"}]}] * 2
    recs.append({"video": "a.mp4", "conversations": [{"from": "robot", "value": "q"}]})
    text = json.dumps(recs, indent=1)
    (tmp_path / "a.json").write_text(text)
    line = text[: text.rindex('"video"')].count("\n")  # the third object's opening brace
    with pytest.raises(ValueError, match=rf"a\.json:{line}: malformed annotation: unknown speaker"):
        read_annotations(tmp_path / "a.json")


# --------------------------------------------------------------------------- skip and count


def corrupt_payload(src: str, dst: Path) -> str:
    """A copy of `src` whose middle half is random bytes: it probes, then fails to decode."""
    data = bytearray(Path(src).read_bytes())
    n = len(data)
    data[n // 4 : n // 2] = np.random.default_rng(0).bytes(n // 2 - n // 4)
    dst.write_bytes(bytes(data))
    return str(dst)


def test_missing_and_corrupt_videos_are_logged_counted_and_skipped(counting, tmp_path,
                                                                   caplog) -> None:
    ann, root = counting
    recs = read_annotations(ann)[:3]
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x01garbage" * 64)
    broken = corrupt_payload(resolve_video(recs[0]["videos"][0], [root]),
                             tmp_path / "broken.mp4")
    (tmp_path / "unreadable.mp4").mkdir()  # a path that exists but cannot be read as a file
    bad = [dict(recs[0], videos=[str(tmp_path / "missing.mp4")], source="x:1"),
           dict(recs[0], videos=[str(tmp_path / "corrupt.mp4")], source="x:2"),
           dict(recs[0], videos=[broken], source="x:3"),
           dict(recs[0], videos=[str(tmp_path / "unreadable.mp4")], source="x:4")]
    cfg = small_cfg(root, shuffle=False)
    ds = make_dataset(bad[:1] + recs[:1] + bad[1:] + recs[1:], qwen_tokenizer(), cfg,
                      shard=NOSHARD)
    it = iter(ds)
    with caplog.at_level(logging.WARNING, logger="nsa_jax.data.stages"):
        batches = list(it)
    assert len(batches) == 3  # the run went on past each bad video
    stats = pipeline_stats(it)
    assert stats["samples"] == 3 and stats["skipped"] == 4
    assert stats["skipped_by_reason"]["FileNotFoundError"] == 1
    assert stats["skipped_by_reason"]["IsADirectoryError"] == 1
    assert sum(stats["skipped_by_reason"].values()) == 4
    messages = [r.getMessage() for r in caplog.records]
    for name, source in [("missing.mp4", "x:1"), ("corrupt.mp4", "x:2"), ("broken.mp4", "x:3"),
                         ("unreadable.mp4", "x:4")]:
        # path, annotation line, then the exception's type and message as the reason
        pattern = rf"skipping \S*/{re.escape(name)} \({source}\): \w+: .+"
        assert any(re.fullmatch(pattern, m, re.DOTALL) for m in messages), (name, messages)


def test_a_bad_video_is_logged_once_and_counted_every_epoch(counting, tmp_path, caplog) -> None:
    ann, root = counting
    recs = read_annotations(ann)[:2]
    bad = dict(recs[0], videos=[str(tmp_path / "missing.mp4")], source="x:1")
    ds = make_dataset([bad, *recs], qwen_tokenizer(), small_cfg(root, num_epochs=3),
                      shard=NOSHARD)
    it = iter(ds)
    with caplog.at_level(logging.WARNING, logger="nsa_jax.data.stages"):
        assert len(list(it)) == 6
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"skipping {tmp_path}/missing.mp4 (x:1): FileNotFoundError: ")
    assert pipeline_stats(it)["skipped_by_reason"] == {"FileNotFoundError": 3}


# --------------------------------------------------------------------------- budget and buckets


def test_a_record_with_more_videos_than_a_row_holds_is_skipped_and_counted(counting) -> None:
    ann, root = counting
    recs = read_annotations(ann)[:2]
    two = dict(recs[0], videos=recs[0]["videos"] * 2, source="x:1",
               messages=[{"role": "user", "content": "<video><video>Same?"},
                         {"role": "assistant", "content": "yes"}])
    it = iter(make_dataset([recs[0], two, recs[1]], qwen_tokenizer(),
                           small_cfg(root, shuffle=False), shard=NOSHARD))
    assert len(list(it)) == 2  # collate never sees it
    assert pipeline_stats(it)["skipped_by_reason"] == {"TooManyVideos": 1}


@pytest.mark.parametrize("epochs", [1, None])
def test_data_whose_every_sample_fails_ends_with_the_first_failures(counting, tmp_path,
                                                                    epochs) -> None:
    ann, root = counting
    recs = [dict(r, videos=[str(tmp_path / f"gone{i}.mp4")], source=f"x:{i}")
            for i, r in enumerate(read_annotations(ann)[:4])]
    it = iter(make_dataset(recs, qwen_tokenizer(), small_cfg(root, shuffle=False,
                                                             num_epochs=epochs),
                           shard=NOSHARD))
    with pytest.raises(NoUsableSamples, match=r"every sample failed; first failures: \S*gone0"
                                              r"\.mp4 \(x:0\): FileNotFoundError: .*gone2\.mp4"):
        next(it)


def test_a_bug_raises_instead_of_skipping_the_sample(counting, monkeypatch) -> None:
    ann, root = counting
    rec = read_annotations(ann)[0]

    def broken(*args, **kwargs):
        raise TypeError("a programming error")

    monkeypatch.setattr("nsa_jax.data.stages.process_sample", broken)
    with pytest.raises(TypeError, match="a programming error"):
        Prepare(qwen_tokenizer(), small_cfg(root))(rec)
    monkeypatch.setattr("nsa_jax.data.stages.process_sample", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        Prepare(qwen_tokenizer(), small_cfg(root))(rec)


def test_token_budget_drops_frames_never_the_answer(tmp_path) -> None:
    cfg_v = dataclasses.replace(SMALL_VIDEO, num_frames=160)
    ann = S.write_dataset(tmp_path, task="needle", num_videos=1, cfg=cfg_v, seed=2)
    tok = qwen_tokenizer()
    rec = read_annotations(ann)[0]
    answer = rec["messages"][-1]["content"]
    big = Prepare(tok, small_cfg(tmp_path, fps=8.0, max_frames=160, max_tokens=4096,
                                 bucket_lengths=(4096,)))(rec)
    small = Prepare(tok, small_cfg(tmp_path, fps=8.0, max_frames=160, max_tokens=400,
                                   bucket_lengths=(512,)))(rec)
    assert not isinstance(big, Skipped) and not isinstance(small, Skipped)
    assert len(big["input_ids"]) > 400 >= len(small["input_ids"])
    assert small["video_grid_thw"][0, 0] < big["video_grid_thw"][0, 0]  # fewer frames
    for out in (big, small):
        lab = out["labels"][out["labels"] != IGNORE]
        assert tok.decode(lab.tolist()) == answer
        assert int((out["input_ids"] == VIDEO_PAD).sum()) * 4 == out["pixel_values_videos"].shape[0]


def test_a_batch_padded_to_a_longer_bucket_is_the_batch_collated_there(counting) -> None:
    """`collate.pad_batch` (the hosts' common row length) pads as `collate` does."""
    from nsa_jax.data.collate import collate, pad_batch
    from nsa_jax.data.processor import rope_index_for
    from nsa_jax.train.config import load_config

    ann, root = counting
    cfg = small_cfg(root, shuffle=False, max_tokens=512, bucket_lengths=(512,))
    prepare = Prepare(qwen_tokenizer(), cfg, rope_index_for(load_config("tiny").model))
    rows = [[prepare(r)] for r in read_annotations(ann)[:2]]
    short = collate(rows, cfg)
    long = collate(rows, dataclasses.replace(cfg, bucket_lengths=(1024,)))
    padded = pad_batch(short, 1024)
    assert padded.keys() == long.keys() and short["input_ids"].shape[1] == 512
    for key in long:
        np.testing.assert_array_equal(padded[key], long[key], err_msg=key)


def test_batches_use_bucket_lengths(counting) -> None:
    ann, root = counting
    cfg = small_cfg(root, batch_size=2)
    for b in iter(make_dataset(ann, qwen_tokenizer(), cfg, shard=NOSHARD)):
        L = b["input_ids"].shape[1]
        assert L in cfg.bucket_lengths
        assert b["pixel_values_videos"].shape == (2, 4 * L, 1176)
        n = (b["segment_ids"] > 0).sum(1)
        assert (n <= L).all() and ((b["input_ids"] == VIDEO_PAD).sum(1) > 0).all()
        # padding is inert
        assert (b["labels"][b["segment_ids"] == 0] == IGNORE).all()


def probed(seconds: float, height: int, width: int, fps: float = 30.0) -> V.VideoInfo:
    """What probing a constant-rate clip would report (no file needed to plan frames)."""
    n = round(seconds * fps)
    pts = np.arange(n, dtype=np.int64) * 1000
    return V.VideoInfo(pts=pts, keyframe_pts=pts[::30], time_base=1 / (1000 * fps),
                       start_pts=0, width=width, height=height, rotation=0, codec="h264")


@pytest.mark.parametrize("seconds", [30.0, 100.0, 120.0, 300.0, 3600.0])
@pytest.mark.parametrize(("height", "width"), [(1080, 1920), (720, 1280), (224, 224), (1920, 1080)])
def test_videonsa_36k_preset_follows_the_recipe(seconds: float, height: int, width: int) -> None:
    """4 fps, 350-550 frames, <= 50,176 pixels a frame, within the 36K budget."""
    cfg = VIDEONSA_36K
    budget = cfg.max_tokens - 200  # room for a question and an answer
    n, (h, w) = plan_frames(probed(seconds, height, width), budget, cfg, None, None)
    assert n == min(550, max(350, int(seconds * 4)))
    assert h * w <= 50176 and h % 28 == 0 and w % 28 == 0
    assert V.num_video_tokens(V.video_grid(n, h, w)) <= budget


@pytest.mark.parametrize("seconds", [600.0, 1200.0, 3600.0])
@pytest.mark.parametrize(("height", "width"), [(1080, 1920), (224, 224)])
def test_videonsa_128k_preset_stays_within_128k(seconds: float, height: int, width: int) -> None:
    cfg = VIDEONSA_128K
    budget = cfg.max_tokens - 200
    n, (h, w) = plan_frames(probed(seconds, height, width), budget, cfg, None, None)
    tokens = V.num_video_tokens(V.video_grid(n, h, w))
    assert n == min(cfg.max_frames, int(seconds * 4))  # 4 fps up to the 4,096-frame cap
    assert h * w <= 50176 and tokens <= budget
    if n == cfg.max_frames:
        # total_pixels (90% of 128K tokens' worth) shrinks frames rather than dropping them
        assert 100_000 <= tokens <= 0.9 * cfg.max_tokens


def test_preset_table_and_bucket_validation() -> None:
    assert PRESETS["videonsa-36k"] is VIDEONSA_36K
    assert PRESETS["videonsa-128k"] is VIDEONSA_128K
    assert VIDEONSA_36K.max_tokens == 36864 == VIDEONSA_36K.bucket_lengths[-1]
    assert VIDEONSA_128K.max_tokens == 131072 == VIDEONSA_128K.bucket_lengths[-1]
    with pytest.raises(ValueError, match="bucket_lengths"):
        DataConfig(max_tokens=5000, bucket_lengths=(4096,))


# --------------------------------------------------------------------------- packing


def test_packing_aligns_samples_and_matches_unpacked(counting) -> None:
    ann, root = counting
    tok = qwen_tokenizer()
    plain = list(iter(make_dataset(ann, tok, small_cfg(root, shuffle=False), shard=NOSHARD)))
    cfg = small_cfg(root, shuffle=False, pack=True, max_videos_per_row=4)
    packed = list(iter(make_dataset(ann, tok, cfg, shard=NOSHARD)))
    assert len(packed) < len(plain)
    singles = iter(plain)
    for b in packed:
        seg = b["segment_ids"][0]
        poff = 0
        for k in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == k)
            assert idx[0] % 64 == 0 and (np.diff(idx) == 1).all()
            one = next(singles)
            n = (one["segment_ids"][0] == 1).sum()
            assert idx.size == n
            np.testing.assert_array_equal(b["input_ids"][0, idx], one["input_ids"][0, :n])
            np.testing.assert_array_equal(b["labels"][0, idx], one["labels"][0, :n])
            np.testing.assert_array_equal(b["positions"][0, idx], np.arange(n))
            np.testing.assert_array_equal(b["video_grid_thw"][0, k - 1],
                                          one["video_grid_thw"][0, 0])
            npatch = int(np.prod(one["video_grid_thw"][0, 0]))
            np.testing.assert_array_equal(b["pixel_values_videos"][0, poff : poff + npatch],
                                          one["pixel_values_videos"][0, :npatch])
            poff += npatch
        assert (b["video_segment_ids"][0, : seg.max()] == np.arange(1, seg.max() + 1)).all()


def test_packed_nsa_equals_nsa_of_each_sample_alone(rng: np.random.Generator) -> None:
    from nsa_jax.attention import NSAConfig, nsa_attention

    cfg = NSAConfig(block_size=64, num_selected=2, window=64)
    lens = [int(x) for x in rng.integers(70, 200, size=2)]
    starts = [0, round_up(lens[0], 64)]
    T = round_up(starts[1] + lens[1], 64)
    seg = np.zeros((1, T), np.int32)
    for k, (s, n) in enumerate(zip(starts, lens, strict=True)):
        seg[0, s : s + n] = k + 1
    q = rng.standard_normal((1, T, 2, 16)).astype(np.float32)
    kv = rng.standard_normal((2, 1, T, 1, 16)).astype(np.float32)
    g = rng.uniform(0.1, 0.9, size=(1, T, 2, 3)).astype(np.float32)
    out = nsa_attention(jnp.asarray(q), jnp.asarray(kv[0]), jnp.asarray(kv[1]), jnp.asarray(g),
                        cfg, segment_ids=jnp.asarray(seg), implementation="reference")
    for s, n in zip(starts, lens, strict=True):
        sl = slice(s, s + n)
        alone = nsa_attention(jnp.asarray(q[:, sl]), jnp.asarray(kv[0][:, sl]),
                              jnp.asarray(kv[1][:, sl]), jnp.asarray(g[:, sl]), cfg,
                              implementation="reference")
        np.testing.assert_allclose(np.asarray(out[:, sl]), np.asarray(alone), atol=2e-5)
    jax.clear_caches()


# --------------------------------------------------------------------------- sharding and resume


def test_shards_are_disjoint_and_cover(counting) -> None:
    ann, root = counting
    tok = qwen_tokenizer()
    seen = []
    for i in range(2):
        shard = grain.sharding.ShardOptions(shard_index=i, shard_count=2)
        ds = make_dataset(ann, tok, small_cfg(root), shard=shard)
        # a sample is known by its pixels: two videos may share a question and an answer
        seen.append([b["pixel_values_videos"].tobytes() for b in iter(ds)])
    assert len(seen[0]) == len(seen[1]) == 3
    assert len(set(seen[0]) | set(seen[1])) == 6


def test_epochs_are_reshuffled(counting) -> None:
    ann, root = counting
    ds = make_dataset(ann, qwen_tokenizer(), small_cfg(root, num_epochs=2), shard=NOSHARD)
    src = [b["input_ids"][0][:300].tobytes() for b in iter(ds)]
    assert len(src) == 12 and sorted(src[:6]) == sorted(src[6:]) and src[:6] != src[6:]


def test_video_cache_changes_no_batch(counting) -> None:
    ann, root = counting
    plain, cached = (list(make_dataset(ann, qwen_tokenizer(),
                                       small_cfg(root, num_epochs=3, video_cache_mb=mb),
                                       shard=NOSHARD)) for mb in (0, 64))
    assert len(cached) == len(plain) == 18
    for a, b in zip(plain, cached, strict=True):
        chex.assert_trees_all_equal(a, b)


def test_video_cache_decodes_each_clip_once(counting, monkeypatch) -> None:
    ann, root = counting
    decoded: list[str] = []
    load = V.load_video
    monkeypatch.setattr(V, "load_video", lambda p, **kw: decoded.append(p) or load(p, **kw))
    prep = Prepare(qwen_tokenizer(), small_cfg(root, video_cache_mb=64))
    recs = read_annotations(ann)
    first = [prep(r) for r in recs]
    again = [prep(r) for r in recs]
    assert len(decoded) == len(set(decoded)) == len(recs) and prep.cache.hits == len(recs)
    for a, b in zip(first, again, strict=True):
        chex.assert_trees_all_equal({k: v for k, v in a.items() if k != "source"},
                     {k: v for k, v in b.items() if k != "source"})


def test_video_cache_evicts_the_least_recently_used_clips_within_its_bytes(tmp_path) -> None:
    def clip(i: int) -> V.Video:
        return V.Video(frames=np.full((2, 28, 28, 3), i, np.uint8), timestamps=np.zeros(2),
                       fps=2.0, sample_fps=2.0, path=f"v{i}")

    size = clip(0).frames.nbytes
    cache = VideoCache(int(2.5 * size))
    for i in "abc":
        (tmp_path / i).write_bytes(b"x")
    key = {i: VideoCache.key(str(tmp_path / i), None, None, 100) for i in "abc"}
    cache.put(key["a"], clip(1))
    cache.put(key["b"], clip(2))
    assert cache.get(key["a"]).frames[0, 0, 0, 0] == 1  # a is now the most recent
    cache.put(key["c"], clip(3))  # over budget: b, the least recent, goes
    assert cache.get(key["b"]) is None and cache.get(key["a"]) is not None
    assert cache.get(key["c"]) is not None and cache.bytes == 2 * size
    assert not cache.get(key["c"]).frames.flags.writeable  # a later reader cannot change it
    cache.put(("too big",), V.Video(np.zeros((8, 28, 28, 3), np.uint8), np.zeros(8), 2.0, 2.0,
                                    "big"))
    assert cache.bytes == 2 * size and cache.get(("too big",)) is None
    (tmp_path / "a").write_bytes(b"rewritten")  # a rewritten file is another key
    assert VideoCache.key(str(tmp_path / "a"), None, None, 100) != key["a"]


def test_video_cache_travels_to_decode_workers_empty(counting) -> None:
    ann, root = counting
    prep = Prepare(qwen_tokenizer(), small_cfg(root, video_cache_mb=1))
    recs = read_annotations(ann)
    prep(recs[0])
    copy = pickle.loads(pickle.dumps(prep))  # what grain does to send it to a worker
    assert copy.cache.max_bytes == 1 << 20 and not copy.cache._clips and copy.cache.bytes == 0
    assert copy(recs[0])["input_ids"].tolist() == prep(recs[0])["input_ids"].tolist()


def test_negative_video_cache_is_refused(counting) -> None:
    with pytest.raises(ValueError, match="video_cache_mb"):
        small_cfg(counting[1], video_cache_mb=-1)


@pytest.mark.parametrize("pack", [False, True])
def test_orbax_checkpoint_resumes_the_exact_batches(counting, tmp_path, pack: bool) -> None:
    """The iterator's state is saved with the train state in one orbax checkpoint; a restarted
    run restores both and sees exactly the batches, and skip counts, the first run saw next."""
    ann, root = counting
    recs = read_annotations(ann)
    recs.insert(2, dict(recs[0], videos=["missing.mp4"], source="x:1"))  # skips are state too
    cfg = small_cfg(root, pack=pack, max_videos_per_row=3, num_epochs=2)
    ds = make_dataset(recs, qwen_tokenizer(), cfg, shard=NOSHARD)
    params = {"w": np.arange(6, dtype=np.float32)}
    it = iter(ds)
    for _ in range(2):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(2, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                            data=grain.checkpoint.CheckpointSave(it)))
        mgr.wait_until_finished()
    rest, stats = list(it), pipeline_stats(it)

    resumed = iter(ds)  # a restarted run: a fresh iterator, state only from the checkpoint
    with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
        got = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(
            params=ocp.args.StandardRestore(params),
            data=grain.checkpoint.CheckpointRestore(resumed)))
    np.testing.assert_array_equal(got["params"]["w"], params["w"])
    again = list(resumed)
    assert len(again) == len(rest) >= 2
    for a, b in zip(rest, again, strict=True):
        chex.assert_trees_all_equal(a, b)
    assert pipeline_stats(resumed) == stats and stats["skipped"] == 2  # once per epoch


def test_decode_workers_give_the_main_process_batches(counting) -> None:
    """Worker processes start from a program that is not an absl app (pytest, our CLI)."""
    ann, root = counting
    recs = read_annotations(ann)[:2]
    cfg = small_cfg(root, num_workers=1, video_cache_mb=16)  # the cache travels to the worker
    got = list(iter(make_dataset(recs, qwen_tokenizer(), cfg, shard=NOSHARD)))
    want = list(iter(make_dataset(recs, qwen_tokenizer(),
                                   dataclasses.replace(cfg, num_workers=0, video_cache_mb=0),
                                   shard=NOSHARD)))
    assert len(got) == len(want) == 2
    for a, b in zip(got, want, strict=True):
        chex.assert_trees_all_equal(a, b)


def test_decode_workers_ignore_ctrl_c(counting) -> None:
    """Ctrl-C reaches the decode workers too (one process group): they go on (the training
    process alone stops, after a step), and the batches are those of no interruption."""
    import multiprocessing

    ann, root = counting
    recs = read_annotations(ann)[:3]
    cfg = small_cfg(root, num_workers=1, shuffle=False)
    it = iter(make_dataset(recs, qwen_tokenizer(), cfg, shard=NOSHARD))
    got = [next(it)]
    workers = multiprocessing.active_children()
    assert workers
    for w in workers:
        os.kill(w.pid, signal.SIGINT)
    time.sleep(1.0)
    assert all(w.is_alive() for w in workers)
    got += list(it)
    want = list(iter(make_dataset(recs, qwen_tokenizer(), dataclasses.replace(cfg, num_workers=0),
                                  shard=NOSHARD)))
    assert len(got) == len(want) == 3
    for a, b in zip(got, want, strict=True):
        chex.assert_trees_all_equal(a, b)


@pytest.mark.slow
def test_worker_processes_resume_exactly(counting) -> None:
    ann, root = counting
    cfg = small_cfg(root, num_workers=2, pack=True, max_videos_per_row=3)
    ds = make_dataset(ann, qwen_tokenizer(), cfg, shard=NOSHARD)
    single = list(iter(make_dataset(ann, qwen_tokenizer(), dataclasses.replace(
        cfg, num_workers=0), shard=NOSHARD)))
    it = iter(ds)
    first = next(it)
    state = it.get_state()
    rest = list(it)
    chex.assert_trees_all_equal(first, single[0])
    for a, b in zip(rest, single[1:], strict=True):
        chex.assert_trees_all_equal(a, b)
    it2 = iter(ds)
    it2.set_state(state)
    for a, b in zip(list(it2), rest, strict=True):
        chex.assert_trees_all_equal(a, b)


# --------------------------------------------------------------------------- synthetic tasks


@pytest.mark.parametrize("task", ["needle", "counting", "order"])
def test_synthetic_answers_match_the_video(tmp_path, task: str) -> None:
    from nsa_jax.data import load_video

    ann = S.write_dataset(tmp_path, task=task, num_videos=2, cfg=SMALL_VIDEO, seed=5)
    for line in Path(ann).read_text().splitlines():
        rec = json.loads(line)
        v = load_video(tmp_path / rec["video"], fps=SMALL_VIDEO.fps, max_frames=10**4,
                       min_pixels=784, max_pixels=10**6)
        assert v.frames.shape[0] == SMALL_VIDEO.num_frames
        h, w = v.frames.shape[1:3]
        centre = v.frames[:, h // 2 - 4 : h // 2 + 4, w // 2 - 4 : w // 2 + 4].mean((1, 2))
        lit = (centre.max(1) > 150) & (centre.max(1) - centre.min(1) > 60) | (centre.min(1) > 200)
        onsets = np.flatnonzero(lit & ~np.r_[False, lit[:-1]])
        answer = rec["conversations"][1]["value"]
        if task == "counting":
            assert len(onsets) == int(answer)
        else:
            colours = {k: np.asarray(c) for k, c in S.COLOURS.items()}
            first = centre[onsets[0]]
            nearest = min(colours, key=lambda k: np.abs(colours[k] - first).sum())
            assert nearest == answer


def test_block_shard_deals_blocks_and_keeps_every_record_of_one_shard() -> None:
    ten = grain.MapDataset.range(10)
    # two shards in blocks of 2: the last partial round (records 8, 9) is dropped so that
    # both shards have as many
    assert [list(BlockShard(ten, i, 2, 2)) for i in (0, 1)] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    # one shard has no peer to keep even with: fewer records than a block are all kept
    assert list(BlockShard(ten, 0, 1, 8)) == list(range(10))
    assert list(BlockShard(grain.MapDataset.range(6), 0, 1, 8)) == list(range(6))
