from pathlib import Path

import pytest

import rewards

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def gsm8k_dir():
    d = SHARED_DATA / "gsm8k"
    if not (d / "test.jsonl").exists():
        pytest.skip(f"GSM8K data not found at {d} (the ../shared/data checkout sits beside the project in CI only)")
    return d


def even_length(completion, example):
    # A dense signal for an untrained model: about half its completions score 1, so advantages are non-zero.
    even = len(completion) % 2 == 0
    return rewards.RewardResult(float(even), "correct" if even else "wrong")


@pytest.fixture(scope="module")
def even_length_reward():
    """The reward `test_even_length` (`even_length`) for the module's tests; removed after them."""
    with rewards.registered("test_even_length", even_length):
        yield "test_even_length"


@pytest.fixture(scope="session")
def load_bench():
    """Import a bench/ script as a module by its file name (bench/ is not a package)."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(
            f"bench_{name}", Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
        )
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load
