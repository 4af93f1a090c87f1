"""The base of the tests that run a pure function under `chex.variants` (`with_jit`,
`without_jit`): a `chex.TestCase` with the suite's fresh random generator, seeded from the
test's id as `conftest.rng` seeds it from the node id (fresh per test and variant,
reproducible per name). pytest fixtures do not reach `unittest` classes, hence this."""

from __future__ import annotations

import zlib

import chex
import numpy as np


class VariantsTestCase(chex.TestCase):
    rng: np.random.Generator

    def setUp(self) -> None:
        super().setUp()
        self.rng = np.random.default_rng(zlib.crc32(self.id().encode()))
