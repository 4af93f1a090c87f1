"""What conversion keeps of the Hugging Face directory a checkpoint came from, so that
`jax-to-hf` writes it back as it was published: the same files, keys, key layout, tensor order,
shard metadata, index and `config.json`.

Kept in our checkpoint as `CKPT/hf_source/`: `config.json` and `model.safetensors.index.json`
(the source's own files, byte for byte; the index only when the source had one) and
`layout.json` (`{"files": {file: [[key, dtype name], ...]}, "metadata": {file: {...}}}`, each
file's keys in the order of their bytes).
"""

from __future__ import annotations

import dataclasses
import json
import os

from nsa_jax.convert.files import CheckpointError

SOURCE = "hf_source"
LAYOUT = "layout.json"
CONFIG = "config.json"
INDEX = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class HFSource:
    """How a Hugging Face directory stored its tensors, and its config.

    Attributes:
      files: `{file name: ((key, NumPy dtype name), ...)}` in the order of the bytes.
      metadata: `{file name: __metadata__}` of each file.
      config: the text of its `config.json`.
      index: the text of its `model.safetensors.index.json`, or None (one
        `model.safetensors`).
    """

    files: dict[str, tuple[tuple[str, str], ...]]
    metadata: dict[str, dict[str, str]]
    config: str
    index: str | None

    @property
    def keys(self) -> set[str]:
        return {key for entries in self.files.values() for key, _ in entries}

    @property
    def key_layout(self) -> str:
        """The key layout, as `names.hf_name` names it: "new" (`model.language_model.*`,
        `model.visual.*`) or "old" (`model.layers.*`, `visual.*`)."""
        new = ("model.language_model.", "model.visual.")
        return "new" if any(k.startswith(new) for k in self.keys) else "old"


def save_source(ckpt_dir: str, source: HFSource) -> None:
    """Writes `source` as `ckpt_dir/hf_source/`."""
    path = os.path.join(ckpt_dir, SOURCE)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG), "w") as f:
        f.write(source.config)
    if source.index is not None:
        with open(os.path.join(path, INDEX), "w") as f:
            f.write(source.index)
    layout = {
        "files": {name: [list(e) for e in entries] for name, entries in source.files.items()},
        "metadata": source.metadata,
    }
    with open(os.path.join(path, LAYOUT), "w") as f:
        json.dump(layout, f, indent=1)


def load_source(ckpt_dir: str) -> HFSource | None:
    """The `HFSource` kept in `ckpt_dir/hf_source/`, or None when the checkpoint has none
    (written by training or from a model in memory)."""
    path = os.path.join(ckpt_dir, SOURCE)
    if not os.path.isdir(path):
        return None
    try:
        with open(os.path.join(path, LAYOUT)) as f:
            layout = json.load(f)
        with open(os.path.join(path, CONFIG)) as f:
            config = f.read()
        index = None
        if os.path.exists(os.path.join(path, INDEX)):
            with open(os.path.join(path, INDEX)) as f:
                index = f.read()
        files = {
            name: tuple((str(k), str(d)) for k, d in entries)
            for name, entries in layout["files"].items()
        }
        return HFSource(files, dict(layout["metadata"]), config, index)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{path}: damaged ({e}); remove {SOURCE}/ to write the default Hugging Face layout"
        ) from None
