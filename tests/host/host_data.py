"""Names the host-tool tests use for the real models/images in ../shared/test_data.

The paths themselves live in ``tests/data.py`` (one place for the whole test suite).
"""

from __future__ import annotations

from tests.data import BIRD, IMAGES, LABELS, MODELS, REPO, SHARED as TEST_DATA, VOC  # noqa: F401
from tests.data import DM05 as DM05_QUANT  # noqa: F401
from tests.data import DM10 as DM10_QUANT  # noqa: F401
from tests.data import FLOAT_257 as DM05_FLOAT_257  # noqa: F401
from tests.data import FP16_513 as DM05_FP16_513  # noqa: F401

CALIB_COUNT = 4  # few calibration images keep CI fast; the CLI default is 100
