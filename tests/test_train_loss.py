"""The chunked answer-token loss: equal to the full-logits loss (values and gradients) on the
tiny models, answer targets with padding and packed samples, and memory linear in T."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from nsa_jax.config import preset
from nsa_jax.data.processor import IGNORE
from nsa_jax.model.inputs import prepare
from nsa_jax.model.vlm import init_model
from nsa_jax.train.batch import model_batch, synthetic_batch
from nsa_jax.train.config import CONFIGS
from nsa_jax.train.loss import (
    answer_bucket,
    answer_targets,
    chunked_cross_entropy,
    gather_positions,
)

from variants import VariantsTestCase


def naive_loss(logits: jax.Array, labels: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Sum over supervised next tokens of -log softmax, from full `[B, T, vocab]` logits."""
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    nxt = labels[:, 1:]
    ok = (nxt != IGNORE) & (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] > 0)
    picked = jnp.take_along_axis(lp, jnp.where(ok, nxt, 0)[..., None], -1)[..., 0]
    return -jnp.sum(jnp.where(ok, picked, 0.0))


def test_answer_targets_skip_padding_and_sample_boundaries() -> None:
    labels = np.full((2, 10), IGNORE)
    seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0, 0, 0], [1] * 6 + [0] * 4])
    labels[0, [2, 3, 4, 6]] = [11, 12, 13, 14]  # 4 starts sample 2: nothing predicts it
    labels[1, [5, 6]] = [21, 22]  # 6 is padding
    pos, tgt, w = answer_targets(labels, seg)
    assert pos.shape == (2, 4)  # 3 answer tokens: the smallest bucket (4)
    assert w.sum(1).tolist() == [3, 1]
    assert pos[0, :3].tolist() == [1, 2, 5] and tgt[0, :3].tolist() == [11, 12, 14]
    assert pos[1, :1].tolist() == [4] and tgt[1, :1].tolist() == [21]
    assert answer_bucket(0, 100) == 4 and answer_bucket(5, 100) == 8
    assert answer_bucket(17, 100) == 32 and answer_bucket(3, 2) == 2
    assert answer_bucket(300, 100) == 100


class TestChunkedLoss(VariantsTestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(1, 5, 64)
    def test_chunked_loss_equals_full_logits_loss(self, chunk: int) -> None:
        b, t, h, v = 2, 37, 8, 50
        x = jnp.asarray(self.rng.standard_normal((b, t, h)), jnp.float32)
        w = jnp.asarray(self.rng.standard_normal((h, v)), jnp.float32)
        labels = np.where(self.rng.random((b, t)) < 0.4, self.rng.integers(0, v, (b, t)), IGNORE)
        seg = np.ones((b, t), np.int32)
        seg[0, 20:] = 2
        seg[1, 30:] = 0
        pos, tgt, wts = answer_targets(labels, seg)  # host NumPy: the batch's, before the step

        def chunked(x, w, pos, tgt, wts):
            return chunked_cross_entropy(gather_positions(x, pos), w, tgt, wts, chunk)

        def full(x, w, labels, seg):
            return naive_loss(x @ w, labels, seg)

        got = self.variant(jax.value_and_grad(chunked, (0, 1)))(x, w, pos, tgt, wts)
        want = jax.value_and_grad(full, (0, 1))(x, w, jnp.asarray(labels), jnp.asarray(seg))
        chex.assert_trees_all_close(got[0], want[0], rtol=1e-6)
        chex.assert_trees_all_close(got[1], want[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-preset", "tiny-train"])
def test_hidden_output_and_output_kernel_give_the_models_logits(name: str) -> None:
    """The loss path (hidden states of the per-row video layout, `output_kernel`) computes the
    same function as the model's own forward (one sample at a time, transformers' layout) and
    the full-logits loss. Its gradients are then autodiff's of the same function, with the
    loss's own (custom) gradient checked above."""
    cfg = preset("tiny").with_attention(nsa=CONFIGS["tiny"].model.nsa) if name == "tiny-preset" \
        else CONFIGS["tiny"].model  # untied head / tied embeddings
    # one hybrid layer and one vision block: the whole path, half the compilation
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=1),
                      vision=dataclasses.replace(cfg.vision, depth=1, fullatt_block_indexes=(0,)))
    model = init_model(cfg, seed=1)
    raw = synthetic_batch(cfg, 2, 96, answer_tokens=5, frame_patches=(4, 4), seed=2)
    batch = model_batch(raw, cfg)
    from flax import nnx

    graphdef, params = nnx.split(model, nnx.Param)

    def ours(params: nnx.State) -> jax.Array:
        m = nnx.merge(graphdef, params)
        h = m.forward(batch.input_ids, batch.position_ids, batch.segment_ids,
                      videos=batch.videos, text_rows=batch.text_rows, return_hidden=True)
        return chunked_cross_entropy(gather_positions(h, batch.loss_positions),
                                     m.output_kernel(), batch.loss_targets, batch.loss_weights, 4)

    # the model's own call: one sample at a time, transformers' layout
    seg = raw["segment_ids"]

    def theirs(params: nnx.State) -> jax.Array:
        m = nnx.merge(graphdef, params)
        total = 0.0
        for r in range(2):
            n = int((seg[r] > 0).sum())
            pv = raw["pixel_values_videos"][r, : int(np.prod(raw["video_grid_thw"][r, 0]))]
            prep = prepare(m.cfg, raw["input_ids"][r : r + 1, :n], pixel_values_videos=pv,
                             video_grid_thw=raw["video_grid_thw"][r],
                             second_per_grid_ts=raw["second_per_grid_ts"][r])
            logits = m.forward(**prep)
            total += naive_loss(logits, jnp.asarray(raw["labels"][r : r + 1, :n]),
                                jnp.asarray(seg[r : r + 1, :n]))
        return total

    assert batch.answer_tokens == 10
    np.testing.assert_allclose(jax.jit(ours)(params), jax.jit(theirs)(params), rtol=2e-5)


def test_loss_memory_grows_linearly_in_t_and_holds_no_logits() -> None:
    """Compiled temporary memory of the loss and its gradients: a constant `[B, chunk, V]`
    block plus `O(T * H)`; the full-logits loss holds `[T, V]`."""
    h, v, chunk = 64, 32768, 128

    def temp_bytes(fn, t: int) -> int:
        args = (jax.ShapeDtypeStruct((1, t, h), jnp.float32),
                jax.ShapeDtypeStruct((h, v), jnp.float32),
                jax.ShapeDtypeStruct((1, t), jnp.int32),
                jax.ShapeDtypeStruct((1, t), jnp.float32))
        grad = jax.jit(jax.grad(fn, (0, 1)))
        return grad.lower(*args).compile().memory_analysis().temp_size_in_bytes

    def chunked(x, w, t, wt):
        return chunked_cross_entropy(x, w, t, wt, chunk)

    def full(x, w, t, wt):
        lp = jax.nn.log_softmax(x @ w, -1)
        return -jnp.sum(jnp.take_along_axis(lp, t[..., None], -1)[..., 0] * wt)

    lengths = (2048, 4096, 8192)
    ours = [temp_bytes(chunked, t) for t in lengths]
    block = chunk * v * 4
    for t, m in zip(lengths, ours, strict=True):
        assert m <= 3 * block + 16 * t * h * 4, (t, m)
        assert m < t * v * 4 / 4  # far below one f32 [T, vocab] array
    assert ours[-1] - ours[0] <= 16 * (lengths[-1] - lengths[0]) * h * 4
    assert temp_bytes(full, 4096) >= 4096 * v * 4  # the measurement sees the logits
