"""Run metrics: `OUT/metrics.jsonl` (one JSON object per optimiser step) and TensorBoard event
files (`OUT/tensorboard/`). Only JAX process 0 writes."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from tensorboardX import SummaryWriter


class MetricsLog:
    """Appends step records; on a resume, drops the records past the restored step first (the
    resumed run logs those steps again)."""

    def __init__(self, out_dir: str, *, enabled: bool, tensorboard: bool,
                 resume_step: int = 0) -> None:
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self._truncate(resume_step)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=resume_step
                                    if resume_step else None)

    def _truncate(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def write(self, record: Mapping[str, Any]) -> None:
        """One step's record (`step` required); numbers also go to TensorBoard as scalars
        `train/<key>`, and the numbers of a dict entry as `train/<key>/<name>` (e.g.
        `train/skipped_by_reason/FileNotFoundError`)."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key == "step":
                    continue
                named = value.items() if isinstance(value, Mapping) else [(None, value)]
                for name, x in named:
                    if isinstance(x, (int, float)):
                        tag = f"train/{key}" if name is None else f"train/{key}/{name}"
                        self.tb.add_scalar(tag, x, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
