import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def gsm8k_dir():
    d = SHARED_DATA / "gsm8k"
    if not (d / "test.jsonl").exists():
        pytest.skip(f"GSM8K data not found at {d} (the ../shared/data checkout sits beside the project in CI only)")
    return d
