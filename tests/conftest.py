from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def gsm8k_dir():
    d = SHARED_DATA / "gsm8k"
    if not (d / "test.jsonl").exists():
        pytest.skip(f"GSM8K data not found at {d} (the ../shared/data checkout sits beside the project in CI only)")
    return d


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
