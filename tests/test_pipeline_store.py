"""Stage directories: built aside and renamed into place, built once when runs race, resumable work kept."""

import threading
import time

import pytest

import tasks  # noqa: F401  (offline Prefect / MLflow defaults before prefect is imported)

# isort: split
from gspo.config import load_config
from tasks.common import FilesRead, build, damaged, pick


def test_racing_runs_of_one_stage_build_it_once_and_share_the_result(tmp_path):
    final, calls, results = tmp_path / "train" / "k1", [], []

    def make(work):
        calls.append(work)
        time.sleep(0.3)  # long enough for the other threads to arrive while this one builds
        (work / "weights.bin").write_bytes(b"w")
        return {"weights": str(work / "weights.bin"), "n": 1}

    threads = [threading.Thread(target=lambda: results.append(build(final, make))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [{"weights": str(final / "weights.bin"), "n": 1}] * 4  # paths point at the final place
    assert (final / "weights.bin").read_bytes() == b"w"
    assert sorted(p.name for p in final.parent.iterdir()) == [".k1.lock", "k1"]


def test_a_stage_directory_missing_a_file_or_with_a_file_of_another_size_is_built_again(tmp_path):
    final, calls = tmp_path / "train" / "k", []

    def make(work):
        calls.append(work)
        (work / "model").mkdir()
        (work / "model" / "weights.bin").write_bytes(b"w" * 100)
        return {"dir": str(work / "model")}

    assert build(final, make) == {"dir": str(final / "model")} and damaged(final) is None
    assert build(final, make) and len(calls) == 1  # intact: reused
    (final / "model" / "weights.bin").write_bytes(b"w" * 10)  # truncated
    assert "weights.bin is not the size it was written with" in damaged(final)
    build(final, make)
    assert len(calls) == 2 and (final / "model" / "weights.bin").stat().st_size == 100
    (final / "model" / "weights.bin").unlink()
    assert "weights.bin is gone" in damaged(final)
    build(final, make)
    assert len(calls) == 3 and damaged(final) is None
    assert damaged(tmp_path / "train" / "other") == f"{tmp_path / 'train' / 'other'} is gone"


def test_different_keys_build_side_by_side(tmp_path):
    a = build(tmp_path / "s" / "a", lambda w: {"v": "a"})
    b = build(tmp_path / "s" / "b", lambda w: {"v": "b"})
    assert (a, b) == ({"v": "a"}, {"v": "b"})


def test_a_failed_build_leaves_nothing_a_later_run_would_trust(tmp_path):
    final = tmp_path / "eval" / "k"

    def broken(work):
        (work / "half.jsonl").write_text("{")
        raise ValueError("bad data")

    with pytest.raises(ValueError, match="bad data"):
        build(final, broken)
    assert not final.exists() and [p.name for p in final.parent.iterdir()] == [".k.lock"]
    assert build(final, lambda w: {"ok": True}) == {"ok": True}


def test_a_resumable_stage_keeps_its_work_for_the_next_attempt(tmp_path):
    final, seen = tmp_path / "train" / "k", []

    def crash(work):
        (work / "checkpoint").write_text("step 2")
        raise RuntimeError("killed")

    def resume(work):
        seen.append((work / "checkpoint").read_text())
        return {"ckpt": str(work / "checkpoint")}

    with pytest.raises(RuntimeError):
        build(final, crash, resumable=True)
    assert build(final, resume, resumable=True) == {"ckpt": str(final / "checkpoint")}
    assert seen == ["step 2"] and not (final.parent / ".k.work").exists()


def test_pick_keeps_only_what_a_stage_reads_and_never_the_progress_switch():
    cfg = load_config(None, ["train.progress=false", "train.seed=3"])
    assert pick(cfg, {"train": ["seed"], "model": ["name"]}) == {"train": {"seed": 3}, "model": {"name": "tiny"}}
    assert "progress" not in pick(cfg, {"train": True})["train"]


def test_files_read_follows_file_contents(tmp_path):
    f = tmp_path / "test.jsonl"
    policy = FilesRead(files=lambda inputs: [inputs["path"]])
    key = lambda: policy.compute_key(None, {"path": str(f)}, {})  # noqa: E731
    missing = key()
    f.write_text("a\n")
    first = key()
    assert first != missing and key() == first
    f.write_text("b\n")
    assert key() != first


def test_runs_setting_the_same_registry_tags_at_once_all_succeed(tmp_path):
    # MLflow's sqlite store sets a tag by select-then-insert: of two writers of one new key, the second insert
    # fails on the unique key (a bare MlflowClient fails here about once per round). Two runs of one config
    # write the same score tags to the same version this way.
    from tasks.store import client

    c = client(f"sqlite:///{tmp_path}/mlflow.db", 5.0)
    c.create_registered_model("m")
    run = c.create_run(c.create_experiment("e"))
    version = c.create_model_version("m", "runs:/x/checkpoint", run_id=run.info.run_id).version
    errors = []

    def writer(key, barrier):
        barrier.wait()
        try:
            c.set_model_version_tag("m", version, key, "1")
            c.set_registered_model_alias("m", "candidate", version)
        except Exception as e:
            errors.append(e)

    for round_ in range(20):
        barrier = threading.Barrier(4)
        threads = [threading.Thread(target=writer, args=(f"score.t{round_}", barrier)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    tags = c.get_model_version("m", version).tags
    assert all(tags[f"score.t{r}"] == "1" for r in range(20))
