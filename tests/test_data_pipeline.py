"""grain pipeline: annotation formats, skip-and-count, token budget, buckets, packing, resume."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from data_helpers import qwen_tokenizer

from nsa_jax.data import pipeline as P
from nsa_jax.data import synthetic as S
from nsa_jax.data.processor import IGNORE, VIDEO_PAD

NOSHARD = grain.sharding.NoSharding()
SMALL_VIDEO = S.SyntheticConfig(num_frames=48, height=56, width=84, fps=8.0, event_frames=3)


def small_cfg(root, **kw) -> P.DataConfig:
    base = dict(fps=2.0, min_pixels=784, max_pixels=784 * 6, max_tokens=1024,
                bucket_lengths=(256, 512, 1024), video_roots=(str(root),), seed=3)
    return P.DataConfig(**{**base, **kw})


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
    recs = P.read_annotations([tmp_path / "l.json", tmp_path / "s.jsonl"])
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
        P.read_annotations(p)
    p.write_text(good + "\n" + json.dumps({"video": "a.mp4", "conversations": [
        {"from": "human", "value": "q"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed annotation: no non-empty"):
        P.read_annotations(p)


def test_malformed_json_array_record_names_its_line(tmp_path) -> None:
    recs = [{"video": "a.mp4", "conversations": [{"from": "human", "value": "q"},
                                                 {"from": "gpt", "value": "a"}]}] * 2
    recs.append({"video": "a.mp4", "conversations": [{"from": "robot", "value": "q"}]})
    text = json.dumps(recs, indent=1)
    (tmp_path / "a.json").write_text(text)
    line = text[: text.rindex('"video"')].count("\n")  # the third object's opening brace
    with pytest.raises(ValueError, match=rf"a\.json:{line}: malformed annotation: unknown speaker"):
        P.read_annotations(tmp_path / "a.json")


# --------------------------------------------------------------------------- skip and count


def test_missing_and_corrupt_videos_are_logged_counted_and_skipped(counting, tmp_path,
                                                                   caplog) -> None:
    ann, root = counting
    recs = P.read_annotations(ann)[:3]
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x01garbage" * 64)
    bad = [dict(recs[0], videos=[str(tmp_path / "missing.mp4")], source="x:1"),
           dict(recs[0], videos=[str(tmp_path / "corrupt.mp4")], source="x:2")]
    cfg = small_cfg(root, shuffle=False)
    ds = P.make_dataset(bad[:1] + recs[:1] + bad[1:] + recs[1:], qwen_tokenizer(), cfg,
                        shard=NOSHARD)
    it = iter(ds)
    with caplog.at_level(logging.WARNING, logger="nsa_jax.data.pipeline"):
        batches = list(it)
    assert len(batches) == 3
    stats = P.pipeline_stats(it)
    assert stats["samples"] == 3 and stats["skipped"] == 2
    assert stats["skipped_by_reason"].get("FileNotFoundError") == 1
    text = caplog.text
    assert "missing.mp4" in text and "corrupt.mp4" in text and "x:2" in text


# --------------------------------------------------------------------------- budget and buckets


def test_token_budget_drops_frames_never_the_answer(tmp_path) -> None:
    cfg_v = dataclasses.replace(SMALL_VIDEO, num_frames=160)
    ann = S.write_dataset(tmp_path, task="needle", num_videos=1, cfg=cfg_v, seed=2)
    tok = qwen_tokenizer()
    rec = P.read_annotations(ann)[0]
    answer = rec["messages"][-1]["content"]
    big = P.Prepare(tok, small_cfg(tmp_path, fps=8.0, max_frames=160, max_tokens=4096,
                                   bucket_lengths=(4096,)))(rec)
    small = P.Prepare(tok, small_cfg(tmp_path, fps=8.0, max_frames=160, max_tokens=400,
                                     bucket_lengths=(512,)))(rec)
    assert not isinstance(big, P.Skipped) and not isinstance(small, P.Skipped)
    assert len(big["input_ids"]) > 400 >= len(small["input_ids"])
    assert small["video_grid_thw"][0, 0] < big["video_grid_thw"][0, 0]  # fewer frames
    for out in (big, small):
        lab = out["labels"][out["labels"] != IGNORE]
        assert tok.decode(lab.tolist()) == answer
        assert int((out["input_ids"] == VIDEO_PAD).sum()) * 4 == out["pixel_values_videos"].shape[0]


def test_batches_use_bucket_lengths(counting) -> None:
    ann, root = counting
    cfg = small_cfg(root, batch_size=2)
    for b in iter(P.make_dataset(ann, qwen_tokenizer(), cfg, shard=NOSHARD)):
        L = b["input_ids"].shape[1]
        assert L in cfg.bucket_lengths
        assert b["pixel_values_videos"].shape == (2, 4 * L, 1176)
        n = (b["segment_ids"] > 0).sum(1)
        assert (n <= L).all() and ((b["input_ids"] == VIDEO_PAD).sum(1) > 0).all()
        # padding is inert
        assert (b["labels"][b["segment_ids"] == 0] == IGNORE).all()


def test_presets() -> None:
    assert P.VIDEONSA_36K.fps == 4.0 and P.VIDEONSA_36K.max_pixels == 50176
    assert (P.VIDEONSA_36K.min_frames, P.VIDEONSA_36K.max_frames) == (350, 550)
    assert P.VIDEONSA_128K.max_tokens == 131072 == P.VIDEONSA_128K.bucket_lengths[-1]
    with pytest.raises(ValueError, match="bucket_lengths"):
        P.DataConfig(max_tokens=5000, bucket_lengths=(4096,))


# --------------------------------------------------------------------------- packing


def test_packing_aligns_samples_and_matches_unpacked(counting) -> None:
    ann, root = counting
    tok = qwen_tokenizer()
    plain = list(iter(P.make_dataset(ann, tok, small_cfg(root, shuffle=False), shard=NOSHARD)))
    cfg = small_cfg(root, shuffle=False, pack=True, max_videos_per_row=4)
    packed = list(iter(P.make_dataset(ann, tok, cfg, shard=NOSHARD)))
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
    starts = [0, P._aligned(lens[0], 64)]
    T = P._aligned(starts[1] + lens[1], 64)
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
        ds = P.make_dataset(ann, tok, small_cfg(root), shard=shard)
        # a sample is known by its pixels: two videos may share a question and an answer
        seen.append([b["pixel_values_videos"].tobytes() for b in iter(ds)])
    assert len(seen[0]) == len(seen[1]) == 3
    assert len(set(seen[0]) | set(seen[1])) == 6


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("pack", [False, True])
def test_iterator_state_resumes_exactly(counting, pack: bool) -> None:
    ann, root = counting
    cfg = small_cfg(root, pack=pack, max_videos_per_row=3, num_epochs=2, batch_size=1)
    ds = P.make_dataset(ann, qwen_tokenizer(), cfg, shard=NOSHARD)
    it = iter(ds)
    for _ in range(2):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what orbax stores (JSON)
    rest = list(it)
    assert len(rest) >= 2
    it2 = iter(ds)
    it2.set_state(state)
    again = list(it2)
    assert len(again) == len(rest)
    for a, b in zip(rest, again, strict=True):
        _assert_same(a, b)
    assert P.pipeline_stats(it2) == P.pipeline_stats(it)


def test_epochs_are_reshuffled(counting) -> None:
    ann, root = counting
    ds = P.make_dataset(ann, qwen_tokenizer(), small_cfg(root, num_epochs=2), shard=NOSHARD)
    src = [b["input_ids"][0][:300].tobytes() for b in iter(ds)]
    assert len(src) == 12 and sorted(src[:6]) == sorted(src[6:]) and src[:6] != src[6:]


def test_orbax_checkpoint_of_iterator(counting, tmp_path) -> None:
    ocp = pytest.importorskip("orbax.checkpoint")
    ann, root = counting
    ds = P.make_dataset(ann, qwen_tokenizer(), small_cfg(root), shard=NOSHARD)
    it = iter(ds)
    next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mgr.wait_until_finished()
        want = next(it)
        it2 = iter(ds)
        mgr.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
    _assert_same(next(it2), want)


@pytest.mark.slow
def test_worker_processes_resume_exactly(counting) -> None:
    ann, root = counting
    cfg = small_cfg(root, num_workers=2, pack=True, max_videos_per_row=3)
    ds = P.make_dataset(ann, qwen_tokenizer(), cfg, shard=NOSHARD)
    single = list(iter(P.make_dataset(ann, qwen_tokenizer(), dataclasses.replace(
        cfg, num_workers=0), shard=NOSHARD)))
    it = iter(ds)
    first = next(it)
    state = it.get_state()
    rest = list(it)
    _assert_same(first, single[0])
    for a, b in zip(rest, single[1:], strict=True):
        _assert_same(a, b)
    it2 = iter(ds)
    it2.set_state(state)
    for a, b in zip(list(it2), rest, strict=True):
        _assert_same(a, b)


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
