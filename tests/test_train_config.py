"""Train config (names, YAML, overrides), mesh parsing, sharding rules and optimiser groups:
no compilation, so fast."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml

from nsa_jax.axes import MESH_AXES
from nsa_jax.config import PRESETS, ModelConfig
from nsa_jax.convert.names import our_param_shapes
from nsa_jax.train import optim, sharding
from nsa_jax.train.checkpoint import config_differences
from nsa_jax.train.config import (
    CONFIGS,
    TrainConfig,
    dump_config,
    from_dict,
    load_config,
    to_dict,
)


def test_shipped_configs_follow_the_recipe() -> None:
    assert set(CONFIGS) == {"tiny", "demo", "videonsa-7b-36k", "videonsa-7b-128k", "gpu-small"}
    c = CONFIGS["videonsa-7b-36k"]
    assert (c.optim.lr, c.optim.warmup, c.optim.weight_decay, c.optim.clip_norm) == (
        1e-6, 0.1, 0.01, 1.0)
    assert (c.per_shard_batch, c.grad_accum, c.compute_dtype) == (1, 4, "bfloat16")
    assert (c.data.fps, c.data.max_pixels, c.data.max_tokens) == (4.0, 50176, 36864)
    assert c.model.nsa is not None and c.model.text.hidden_size == 3584
    assert not any(g.frozen for g in (c.optim.vision, c.optim.merger, c.optim.language,
                                      c.optim.gates))  # the whole model trains
    assert CONFIGS["videonsa-7b-128k"].data.max_tokens == 131072
    small = CONFIGS["gpu-small"].model
    assert small.text.hidden_size == 2048 and small.nsa is not None
    # the tiny model reads the real tokenizer's ids
    assert CONFIGS["tiny"].model.text.vocab_size > 151664


def test_the_tiny_train_model_is_the_tiny_preset_with_qwen_ids() -> None:
    """One home for the tiny model's sizes (the model preset); training's reads Qwen's
    tokenizer ids and 151,936-token vocabulary instead of the preset's 1,000."""
    from nsa_jax.config import preset

    tiny, model = load_config("tiny").model, preset("tiny")
    assert tiny.vision == model.vision
    assert dataclasses.replace(tiny.text, vocab_size=1000, tie_word_embeddings=False) == model.text
    assert (tiny.text.vocab_size, tiny.video_token_id, tiny.vision_start_token_id) == (
        151936, 151656, 151652)
    assert tiny.attention.nsa.block_size == 16


def test_the_synthetic_section_gives_every_video_field() -> None:
    """`SyntheticData.video()`, the one copy into the videos' config: each field both name
    (set to a non-default value) arrives; the others keep the video config's defaults."""
    from nsa_jax.data.synthetic import SyntheticConfig
    from nsa_jax.train.config import SyntheticData

    spec = SyntheticData(num_frames=17, height=40, width=56, fps=5.0, event_frames=2,
                         event_size=0.75, max_count=3)
    video = spec.video()
    shared = {f.name for f in dataclasses.fields(SyntheticConfig)} & {
        f.name for f in dataclasses.fields(SyntheticData)}
    assert shared == {"num_frames", "height", "width", "fps", "event_frames", "event_size",
                      "max_count"}
    assert all(getattr(video, n) == getattr(spec, n) != getattr(SyntheticConfig(), n)
               for n in shared)
    assert video.codec == SyntheticConfig().codec


def test_overrides_and_yaml_round_trip(tmp_path) -> None:
    cfg = load_config("tiny", ["optim.lr=3e-4", "mesh=data=2,fsdp=4",
                               "model.attention.nsa.window=64", "optim.gates.frozen=true",
                               "annotations=a.jsonl,b.jsonl", "synthetic=null",
                               "data.bucket_lengths=128,256",
                               "peak_tflops=none"])
    assert cfg.optim.lr == 3e-4 and cfg.mesh == "data=2,fsdp=4"
    assert cfg.model.nsa.window == 64 and cfg.optim.gates.frozen
    assert cfg.annotations == ("a.jsonl", "b.jsonl") and cfg.synthetic is None
    assert cfg.data.bucket_lengths == (128, 256)
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(str(path))
    assert again == cfg  # its own name included
    (tmp_path / "small.yaml").write_text("base: tiny\nsteps: 7\noptim:\n  lr: 0.5\n")
    small = load_config(str(tmp_path / "small.yaml"))
    assert small.steps == 7 and small.optim.lr == 0.5 and small.model == CONFIGS["tiny"].model


def test_kernel_tiles_are_reachable_from_overrides_and_round_trip(tmp_path) -> None:
    """Every tile size of both kernel backends is a `model.attention` override, typed."""
    cfg = load_config("tiny", ["model.attention.gpu_blocks.slc_tokens=2",
                               "model.attention.gpu_blocks.slc_dq_in_dkv=true",
                               "model.attention.tpu_blocks.window.block_q=256",
                               "model.attention.tpu_blocks.selected.block_q=8",
                               "model.attention.implementation=pallas_gpu"])
    attn = cfg.model.attention
    assert (attn.gpu_blocks.slc_tokens, attn.gpu_blocks.slc_dq_in_dkv) == (2, True)
    assert (attn.tpu_blocks.window.block_q, attn.tpu_blocks.selected.block_q) == (256, 8)
    assert attn.implementation == "pallas_gpu" and attn.nsa == CONFIGS["tiny"].model.nsa
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(str(path)) == cfg
    with pytest.raises(ValueError, match=r"block_kv must be a multiple of 16"):
        load_config("tiny", ["model.attention.tpu_blocks.window.block_kv=20"])


def legacy_dict(cfg: TrainConfig) -> dict:
    """`cfg` as configs were saved before `model.attention`: four flat model keys."""
    d = to_dict(cfg)
    attn = d["model"].pop("attention")
    d["model"].update(nsa=attn["nsa"], nsa_layers=attn["layers"],
                      nsa_implementation=attn["implementation"],
                      compat_lse_layout=attn["lse_layout"])
    return d


def test_configs_saved_with_the_flat_attention_keys_still_load(tmp_path) -> None:
    """Older saved configs, YAML files and override paths (`model.nsa...`,
    `model.nsa_layers`, ...) read as today's `model.attention` ones."""
    new = load_config("tiny", ["model.attention.nsa.window=64", "model.attention.layers=1",
                               "model.attention.implementation=reference",
                               "model.attention.lse_layout=correct"])
    old = load_config("tiny", ["model.nsa.window=64", "model.nsa_layers=1",
                               "model.nsa_implementation=reference",
                               "model.compat_lse_layout=correct"])
    assert old == new and new.model.attention.layers == (1,)
    saved = legacy_dict(new)
    assert from_dict(TrainConfig, saved) == new
    assert config_differences(saved, to_dict(new)) == []
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(saved))
    assert dataclasses.replace(load_config(str(tmp_path / "old.yaml")), name=new.name) == new
    # the implementation and the tile sizes steer a run, not its training: a resume may change
    # them; the NSA settings may not
    steered = load_config("tiny", ["model.attention.gpu_blocks.slc_tokens=2",
                                   "model.attention.implementation=auto",
                                   "model.attention.nsa.window=64", "model.attention.layers=1",
                                   "model.attention.lse_layout=correct"])
    assert config_differences(saved, to_dict(steered)) == []
    assert config_differences(saved, to_dict(CONFIGS["tiny"])) == [
        "model.attention.layers: [1] -> None",
        "model.attention.lse_layout: 'correct' -> 'videonsa'",
        "model.attention.nsa.window: 64 -> 32"]


@pytest.mark.parametrize(("override", "message"), [
    ("optim.lrr=1", r"unknown key optim\.lrr"),
    ("steps=many", r"steps: expected int, got 'many'"),
    ("steps=1.5", r"steps: expected int"),
    ("param_dtype=float16", r"param_dtype: 'float16' is not one of"),
    ("optim.gates.frozen=maybe", r"optim\.gates\.frozen: expected true or false"),
    ("data.batch_size=4", r"set per_shard_batch"),
    ("steps", r"is not key=value"),
])
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config("tiny", [override])


def test_unknown_config_and_yaml_key(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown config 'nope'"):
        load_config("nope")
    (tmp_path / "bad.yaml").write_text("optim:\n  nope: 1\n")
    with pytest.raises(ValueError, match="unknown key 'nope'"):
        load_config(str(tmp_path / "bad.yaml"))


@pytest.mark.parametrize(("spec", "n", "want"), [
    ("data=2,fsdp=4", 8, {"data": 2, "fsdp": 4, "tensor": 1, "sequence": 1}),
    ("fsdp=-1", 8, {"data": 1, "fsdp": 8, "tensor": 1, "sequence": 1}),
    ("data=2,tensor=-1", 8, {"data": 2, "fsdp": 1, "tensor": 4, "sequence": 1}),
    ("", 1, {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1}),
    ("sequence=2,data=4", 8, {"data": 4, "fsdp": 1, "tensor": 1, "sequence": 2}),
])
def test_parse_mesh(spec: str, n: int, want: dict[str, int]) -> None:
    assert sharding.parse_mesh(spec, n) == want


@pytest.mark.parametrize(("spec", "message"), [
    ("data=3", "has 3 devices but 8"),
    ("data=-1,fsdp=-1", "only one axis"),
    ("pipeline=2", "is not AXIS=SIZE"),
    ("data=3,fsdp=-1", "not a multiple of 3"),
])
def test_parse_mesh_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sharding.parse_mesh(spec, 8)


class FakeMesh:
    def __init__(self, **shape: int) -> None:
        self.shape = {a: shape.get(a, 1) for a in MESH_AXES}


def axes_of(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def two_layers(name: str) -> ModelConfig:
    """The named model with two decoder layers and two vision blocks: every parameter name and
    shape of the whole model, at a fraction of the time to build."""
    cfg = CONFIGS[name].model if name in CONFIGS else PRESETS[name]
    return dataclasses.replace(
        cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=2),
        vision=dataclasses.replace(cfg.vision, depth=2, fullatt_block_indexes=(1,)))


# untied with gates (7B), tied with gates (3B-shaped), tiny
@pytest.mark.parametrize("name", ["videonsa-7b", "gpu-small", "tiny"])
def test_every_parameter_has_a_sharding_rule(name: str) -> None:
    cfg = two_layers(name)
    mesh = FakeMesh(fsdp=4, tensor=2)
    sharded = 0
    for pname, (shape, _) in our_param_shapes(cfg).items():
        axes = sharding.param_logical_axes(pname, len(shape))
        spec = sharding.logical_to_spec(axes, shape, mesh)
        for dim, entry in zip(shape, spec, strict=False):
            size = int(np.prod([mesh.shape[m] for m in axes_of(entry)]))
            assert dim % size == 0, pname
            sharded += size > 1
    assert sharded


def test_rules_shard_the_7b_model_fully_and_fall_back_when_indivisible() -> None:
    mesh = FakeMesh(data=2, fsdp=4, tensor=2)
    spec = sharding.logical_to_spec(("embed", "mlp"), (3584, 18944), mesh)
    assert [axes_of(e) for e in spec] == [("fsdp",), ("tensor",)]
    # 1004 is not a multiple of 8: that dimension stays whole
    spec = sharding.logical_to_spec(("vocab", "embed"), (1004, 64), FakeMesh(tensor=8, fsdp=4))
    assert [axes_of(e) for e in spec] == [(), ("fsdp",)]
    # the batch takes data and fsdp together
    spec = sharding.logical_to_spec(("batch", None), (8, 3), mesh)
    assert [axes_of(e) for e in spec] == [("data", "fsdp"), ()]
    with pytest.raises(ValueError, match="no sharding rule"):
        sharding.param_logical_axes("language.layers.0.new_thing.kernel", 2)


def test_groups_weight_decay_mask_and_freeze() -> None:
    shapes = {n: s for n, (s, _) in our_param_shapes(CONFIGS["tiny"].model).items()}
    groups = {optim.group_of(n) for n in shapes}
    assert groups == {"vision", "merger", "language", "gates"}
    assert optim.group_of("language.layers.1.self_attn.g_proj_2.kernel") == "gates"
    assert optim.group_of("visual.merger.mlp_0.kernel") == "merger"
    assert optim.group_of("visual.blocks.0.attn.qkv.kernel") == "vision"
    assert optim.group_of("language.embed_tokens.embedding") == "language"
    assert not optim.decays("language.norm.weight", 1)
    assert not optim.decays("visual.blocks.0.attn.qkv.bias", 1)
    assert optim.decays("language.layers.0.mlp.up_proj.kernel", 2)
    assert optim.decays("language.embed_tokens.embedding", 2)
    cfg = load_config("tiny", ["optim.language.frozen=true", "optim.vision.frozen=true"])
    trainable = [n for n in shapes if not optim.is_frozen(cfg, n)]
    assert {optim.group_of(n) for n in trainable} == {"merger", "gates"}


def test_adamw_groups_take_their_own_learning_rate_and_decay() -> None:
    """One update against optax.adamw computed per group by hand."""
    cfg = load_config("tiny", ["optim.lr=0.1", "optim.gates.lr=0.5", "optim.warmup=0",
                               "optim.clip_norm=0", "optim.weight_decay=0.1", "steps=10"])
    shapes = {"language.layers.0.self_attn.g_proj_1.kernel": (3, 3),
              "language.layers.0.mlp.up_proj.kernel": (3, 3), "language.norm.weight": (3,)}
    params = {n: jnp.full(s, 2.0) for n, s in shapes.items()}
    grads = {n: jnp.full(s, 0.3) for n, s in shapes.items()}
    tx = optim.make_optimizer(cfg, shapes)
    updates, _ = tx.update(grads, tx.init(params), params)
    for name, lr in [("language.layers.0.self_attn.g_proj_1.kernel", 0.5),
                     ("language.layers.0.mlp.up_proj.kernel", 0.1), ("language.norm.weight", 0.1)]:
        ref = optax.adamw(lr, weight_decay=0.1 if shapes[name] == (3, 3) else 0.0)
        want, _ = ref.update(grads[name], ref.init(params[name]), params[name])
        np.testing.assert_allclose(updates[name], want, rtol=1e-6, err_msg=name)


def test_a_bf16_first_moment_halves_it_and_keeps_the_update() -> None:
    """`optim.mu_dtype=bfloat16`: Adam's first moment stored in bf16, the second in the
    parameters' f32, and two updates within bf16 rounding of the all-f32 optimiser's."""
    shapes = {"language.layers.0.mlp.up_proj.kernel": (64, 32), "language.norm.weight": (32,)}
    rng = np.random.default_rng(0)
    params = {n: jnp.asarray(rng.normal(size=s), jnp.float32) for n, s in shapes.items()}
    steps = [{n: jnp.asarray(rng.normal(size=s), jnp.float32) for n, s in shapes.items()}
             for _ in range(2)]
    results = []
    for over in ([], ["optim.mu_dtype=bfloat16"]):
        cfg = load_config("tiny", ["optim.lr=0.1", "optim.warmup=0", "steps=10", *over])
        tx = optim.make_optimizer(cfg, shapes)
        state = tx.init(params)
        for grads in steps:
            updates, state = tx.update(grads, state, params)
        results.append((updates, state))
    (want, state32), (got, state16) = results
    dtypes = {(x.shape, jnp.dtype(x.dtype)) for x in jax.tree.leaves(state16) if x.ndim}
    assert {((64, 32), jnp.dtype(jnp.bfloat16)), ((64, 32), jnp.dtype(jnp.float32))} <= dtypes
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state32) if x.ndim)
    for name in shapes:
        scale = float(np.abs(want[name]).max())  # bf16 keeps ~3 significant digits of mu
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-2 * scale,
                                   err_msg=name)


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    cfg = dataclasses.replace(CONFIGS["tiny"], steps=100,
                              optim=dataclasses.replace(CONFIGS["tiny"].optim, lr=1.0,
                                                        warmup=0.1, final_lr_frac=0.1))
    s = optim.schedule(cfg, 1.0)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5)
    assert float(s(10)) == pytest.approx(1.0) and float(s(100)) == pytest.approx(0.1)
    assert cfg.warmup_steps == 10


def test_train_config_defaults_validate() -> None:
    with pytest.raises(ValueError, match="grad_accum must be >= 1"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="optim.warmup"):
        load_config("tiny", ["optim.warmup=1.5"])
    assert jax.tree.leaves(to_dict(TrainConfig()))  # plain data all the way down


def test_flop_counts_per_position_add_up_to_the_attention_counts() -> None:
    from nsa_jax.attention.flops import flops_dense, flops_nsa, nsa_branch_keys
    from nsa_jax.train import flops

    cfg = CONFIGS["videonsa-7b-36k"].model
    t, text = 1000, cfg.text
    hq, d = text.num_attention_heads, text.head_dim
    pos = np.arange(t)
    # each branch's keys counted one by one: compressed blocks whose last token is at or
    # before the query, n whole selection blocks (at most the prefix), the window
    nsa = cfg.nsa
    lasts = np.arange(nsa.num_cmp_blocks(t)) * nsa.cmp_stride + nsa.cmp_block - 1
    want = ([int((lasts <= p).sum()) for p in pos],
            [min(nsa.num_selected * nsa.block_size, p + 1) for p in pos],
            [min(nsa.window, p + 1) for p in pos])
    got = nsa_branch_keys(pos, nsa)
    for branch, g, w in zip(("compressed", "selected", "window"), got, want, strict=True):
        np.testing.assert_array_equal(g, w, err_msg=branch)
    per_key = 4 * hq * d
    assert flops_nsa(t, hq, d, nsa)["total"] == per_key * sum(map(sum, want))
    one = dataclasses.replace(cfg, text=dataclasses.replace(text, num_hidden_layers=1))
    proj = 2 * t * (text.hidden_size * (hq + 2 * text.num_key_value_heads) * d
                    + hq * d * text.hidden_size + 3 * text.hidden_size * text.intermediate_size)
    gates = 2 * t * (text.hidden_size**2 + text.hidden_size * 3 * hq)
    video = np.ones(t, bool)
    assert flops.language_flops(one, pos, video) == pytest.approx(
        proj + gates + flops_nsa(t, hq, d, cfg.nsa)["total"])
    assert flops.language_flops(one, pos, ~video) == pytest.approx(
        proj + gates + flops_dense(t, hq, d))
    assert flops.peak_flops("NVIDIA H200") == 989e12 and flops.peak_flops("cpu") is None
    assert flops.peak_flops("cpu", 2.0) == 2e12
