"""Tokenizer (real Qwen vocabulary, official special ids), chat template, labels, positions."""

from __future__ import annotations

import numpy as np
import pytest
from data_helpers import qwen_tokenizer

from nsa_jax.data import Video
from nsa_jax.data.processor import (
    IGNORE,
    VIDEO_PAD,
    encode_chat,
    process_sample,
    qwen25vl_rope_index,
    rope_index_for,
)
from nsa_jax.data.tokenizer import QWEN25VL_SPECIAL_TOKENS, SPECIAL_IDS, load_tokenizer

IMAGE_PAD = SPECIAL_IDS["<|image_pad|>"]


def test_known_encodings() -> None:
    tok = qwen_tokenizer()
    assert tok.encode("Hello world").ids == [9707, 1879]
    assert tok.get_vocab_size() == 151665
    text = "Which colour appears first, red or blue? 12 frames."
    assert tok.decode(tok.encode(text).ids) == text
    # Qwen2 splits digits one by one
    assert len(tok.encode("12345").ids) == 5


@pytest.mark.parametrize(("tid", "name"), QWEN25VL_SPECIAL_TOKENS)
def test_special_tokens_are_single_tokens_with_official_ids(tid: int, name: str) -> None:
    tok = qwen_tokenizer()
    assert tok.encode(name).ids == [tid]
    assert tok.encode(f"a{name}b").ids[1] == tid


def test_load_tokenizer_from_checkpoint_dir(tmp_path) -> None:
    qwen_tokenizer().save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.encode("<|video_pad|>").ids == [151656]
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "missing")


def test_load_tokenizer_rejects_wrong_special_ids(tmp_path) -> None:
    import tokenizers

    path = tmp_path / "t.json"
    wrong = tokenizers.Tokenizer(tokenizers.models.BPE())
    wrong.add_special_tokens(["<|endoftext|>", "<|im_start|>"])
    wrong.save(str(path))
    with pytest.raises(ValueError, match="expected 151643"):
        load_tokenizer(path)


def test_chat_template_rendering_and_labels(rng: np.random.Generator) -> None:
    tok = qwen_tokenizer()
    n = int(rng.integers(1, 40))
    answer = f"There are {int(rng.integers(1, 9))} flashes."
    msgs = [{"role": "user", "content": "<video>\nHow many flashes?"},
            {"role": "assistant", "content": answer}]
    enc = encode_chat(tok, msgs, [n])
    want = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|>" + "<|video_pad|>" * n + "<|vision_end|>\n"
        "How many flashes?<|im_end|>\n<|im_start|>assistant\n" + answer + "<|im_end|>\n"
    )
    assert tok.decode(enc.input_ids.tolist(), skip_special_tokens=False) == want
    # whole-string tokenization gives the same ids (pads inserted as ids are the same tokens)
    assert enc.input_ids.tolist() == tok.encode(want).ids
    assert int((enc.input_ids == VIDEO_PAD).sum()) == n
    supervised = enc.labels[enc.labels != IGNORE]
    assert tok.decode(supervised.tolist(), skip_special_tokens=False) == answer + "<|im_end|>"
    np.testing.assert_array_equal(enc.labels[enc.labels != IGNORE],
                                  enc.input_ids[enc.labels != IGNORE])


@pytest.mark.parametrize("answer", ["\nred", "\n\nred\n", " red", "red"])
def test_content_starting_with_a_newline_tokenizes_as_the_whole_string(answer: str) -> None:
    """The role header and the content are one string to the tokenizer, as in transformers'
    processor: "assistant\n" + "\nred" has one "\n\n" token, not two "\n" tokens."""
    tok = qwen_tokenizer()
    msgs = [{"role": "user", "content": "\nWhich colour?<video>\n\nTell me."},
            {"role": "assistant", "content": answer}]
    enc = encode_chat(tok, msgs, [3])
    want = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n\nWhich colour?<|vision_start|>" + "<|video_pad|>" * 3
        + "<|vision_end|>\n\nTell me.<|im_end|>\n<|im_start|>assistant\n" + answer
        + "<|im_end|>\n"
    )
    assert enc.input_ids.tolist() == tok.encode(want).ids
    # supervised: the answer (a token it shares with the header counts as the answer's) and
    # <|im_end|>
    supervised = tok.decode(enc.labels[enc.labels != IGNORE].tolist(), skip_special_tokens=False)
    assert supervised in (answer + "<|im_end|>", "\n" + answer + "<|im_end|>")
    assert supervised.endswith(answer.lstrip("\n") + "<|im_end|>")


def test_videos_without_placeholder_go_first_in_first_user_turn() -> None:
    tok = qwen_tokenizer()
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What colour?"},
            {"role": "assistant", "content": "red"}]
    text = tok.decode(encode_chat(tok, msgs, [2]).input_ids.tolist(), skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|video_pad|><|video_pad|><|vision_end|>What colour?")
    with pytest.raises(ValueError, match="placeholders"):
        encode_chat(tok, [{"role": "user", "content": "<video><video>"}], [4])
    with pytest.raises(ValueError, match="unknown role"):
        encode_chat(tok, [{"role": "robot", "content": "hi"}])


def _toy_rope(ids: np.ndarray, grid: np.ndarray, spg: np.ndarray) -> np.ndarray:
    """Stand-in rope index: every axis counts tokens (checks plumbing, not Qwen's rule)."""
    return np.broadcast_to(np.arange(ids.shape[0]), (3, ids.shape[0])).copy()


def _video(rng: np.random.Generator, t: int, h: int, w: int, sample_fps: float = 2.0) -> Video:
    frames = rng.integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)
    return Video(frames, np.arange(t) / sample_fps, fps=30.0, sample_fps=sample_fps)


def test_process_sample_shapes_and_rope_plumbing(rng: np.random.Generator) -> None:
    tok = qwen_tokenizer()
    v = _video(rng, 4, 56, 84)
    msgs = [{"role": "user", "content": "<video>Q?"}, {"role": "assistant", "content": "A."}]
    out = process_sample(tok, msgs, [v], rope_index_fn=_toy_rope)
    assert out["pixel_values_videos"].shape == (2 * 4 * 6, 1176)
    np.testing.assert_array_equal(out["video_grid_thw"], [[2, 4, 6]])
    np.testing.assert_allclose(out["second_per_grid_ts"], [1.0])
    assert int((out["input_ids"] == VIDEO_PAD).sum()) == 2 * 4 * 6 // 4
    assert out["position_ids"].shape == (3, out["input_ids"].shape[0])


def test_qwen25vl_rope_index_positions(rng: np.random.Generator) -> None:
    tok = qwen_tokenizer()
    v = _video(rng, 6, 56, 112, sample_fps=1.0)  # second_per_grid 2 s -> temporal step 4
    msgs = [{"role": "user", "content": "<video>Q?"}, {"role": "assistant", "content": "A."}]
    out = process_sample(tok, msgs, [v], rope_index_fn=qwen25vl_rope_index)
    pos, ids = out["position_ids"], out["input_ids"]
    vid = np.flatnonzero(ids == VIDEO_PAD)
    s = vid[0]
    np.testing.assert_array_equal(pos[:, :s], np.broadcast_to(np.arange(s), (3, s)))
    t, h, w = 3, 2, 4  # merged grid
    tt, hh, ww = np.meshgrid(np.arange(t) * 4, np.arange(h), np.arange(w), indexing="ij")
    np.testing.assert_array_equal(pos[:, vid], np.stack([tt, hh, ww]).reshape(3, -1) + s)
    # text after the video continues from start + max(h, w) (transformers' rule)
    assert pos[0, vid[-1] + 1] == s + max(h, w)


def test_rope_index_for_a_model_gives_the_models_positions(rng: np.random.Generator) -> None:
    """The pipeline's `position_ids` are what `model(...)` computes, for either rope style."""
    from nsa_jax.config import preset
    from nsa_jax.model import init_model
    from nsa_jax.model.inputs import prepare

    tok = qwen_tokenizer()
    # 2 s per temporal patch: temporal positions (0, 4, 8) outrun the merged 2 x 4 grid, where
    # the two styles restart the text after the video at different positions
    v = _video(rng, 6, 56, 112, sample_fps=1.0)
    msgs = [{"role": "user", "content": "<video>Q?"}, {"role": "assistant", "content": "A."}]
    after_video = {}
    for style in ("transformers", "qwen"):
        cfg = preset("tiny").replace(image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD,
                                     rope_index_style=style)
        out = process_sample(tok, msgs, [v], rope_index_fn=rope_index_for(cfg))
        model = init_model(cfg)
        want = prepare(model.cfg, out["input_ids"][None], video_grid_thw=out["video_grid_thw"],
                             second_per_grid_ts=out["second_per_grid_ts"])["position_ids"]
        np.testing.assert_array_equal(out["position_ids"], np.asarray(want)[0])  # [B, 3, T]
        after_video[style] = out["position_ids"][0, -1]
    assert after_video["transformers"] != after_video["qwen"]
