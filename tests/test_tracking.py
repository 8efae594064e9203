"""Tracking backends beside metrics.jsonl: TensorBoard event files and trackio's local store hold
the same numbers as metrics.jsonl."""
import pytest

from align.config import SFTConfig, load_config
from align.tiny import save_tiny_model
from align.tracking import read_metrics
from conftest import write_jsonl


def test_tensorboard_and_trackio_record_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # local store, read before trackio's import
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from align import sft

    base = save_tiny_model(tmp_path / "base")
    demos = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"{i} + {i} =", "completion": str(2 * i)} for i in range(12)])
    run = tmp_path / "run"
    cfg = load_config(SFTConfig, None, [
        f"model.name={base}", f"data.path={demos}", f"train.output_dir={run}", "train.max_steps=3",
        "train.batch_size=4", "log.progress=false", "log.tensorboard=true", "log.trackio=true",
        "log.project=align-test", "train.num_threads=1"])
    sft.run(cfg)
    losses = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}
    assert sorted(losses) == [1, 2, 3]

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    events = {e.step: e.value for e in acc.Scalars("loss")}
    assert events == pytest.approx(losses, rel=1e-6)
    assert "lr" in acc.Tags()["scalars"]

    import trackio
    from trackio.sqlite_storage import SQLiteStorage

    assert str(tmp_path / "trackio") in str(SQLiteStorage.get_project_db_path("align-test"))
    logs = SQLiteStorage.get_logs("align-test", "run")
    tracked = {r["step"]: r["loss"] for r in logs if "loss" in r}
    assert tracked == pytest.approx(losses, rel=1e-6)
    assert trackio is not None
