"""Context parallelism divides the memory: the tiny config's compiled step on 4 CPU devices
needs far fewer temporaries per device with one row's tokens over `sequence=4` than with one
whole row a device (`fsdp=4`), and the parameters shard over `sequence` too.

Before the activations were pinned to the token shards (the vision tower's patches, the
decoder's carry) and the abstract batch was laid out as a run lays it out, `sequence=4` needed
*more* temporaries than a whole row a device (docs/training.md, "Checking a TPU slice")."""

from __future__ import annotations

import json
import subprocess
import sys

from test_train_step import ROOT, subprocess_env

from nsa_jax.train.config import load_config

LENGTH = 2048


def test_sequence_axis_divides_activation_and_state_memory(tmp_path) -> None:
    out = tmp_path / "memory.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sequence_memory_check.py"), str(out),
         str(LENGTH), "fsdp=4", "sequence=4"],
        env=subprocess_env(4), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    whole, split = r["fsdp=4"], r["sequence=4"]
    assert (whole["rows"], split["rows"]) == (4, 1)  # T tokens a device against T / 4
    assert "sequence" in split["pixels_spec"]  # the patch slots arrive on token shards
    # a known part of them: the f32 logits of one loss chunk, [1 row, chunk, vocab]
    cfg = load_config("tiny", [])
    assert whole["temporaries"] >= cfg.loss_chunk * cfg.model.text.vocab_size * 4, whole
    ratio = split["temporaries"] / whole["temporaries"]
    assert ratio <= 0.6, (ratio, r)
    # the state: each parameter over fsdp x sequence, as over fsdp alone
    assert "sequence" in split["up_proj_spec"] and "fsdp" in whole["up_proj_spec"]
