"""Checkpoints: atomic, checksummed, a damaged newest one is skipped in favour of the previous one."""
import pytest
import torch

from align import checkpoint


def _save(root, step, value):
    return checkpoint.save(root, step, {"w": torch.full((4,), float(value))}, {"step": step}, {"train": {"lr": 1.0}},
                           keep=5)


def test_latest_skips_truncated_and_unmarked_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 1, 1.0)
    _save(root, 2, 2.0)
    newest = _save(root, 3, 3.0)
    assert checkpoint.latest(root).name == "step-3"
    data = (newest / "weights.safetensors").read_bytes()
    (newest / "weights.safetensors").write_bytes(data[: len(data) // 2])  # a crash mid-write
    assert checkpoint.latest(root).name == "step-2"
    (root / "step-2" / checkpoint.MARKER).unlink()  # never finished
    assert checkpoint.latest(root).name == "step-1"
    weights, extra = checkpoint.load(checkpoint.latest(root), {"train": {"lr": 1.0}})
    assert torch.equal(weights["w"], torch.ones(4)) and extra["step"] == 1


def test_temporary_directories_never_count(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".step-9.tmp").mkdir(parents=True)
    assert checkpoint.latest(root) is None


def test_keep_prunes_old_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for s in range(1, 5):
        checkpoint.save(root, s, {"w": torch.zeros(1)}, {}, {}, keep=2)
    assert [p.name for p in checkpoint.complete(root)] == ["step-3", "step-4"]


def test_fingerprint_redacts_secrets_and_still_catches_a_changed_field(tmp_path):
    def config(url="http://judge/score", key="sk-live-123"):
        return {"train": {"lr": 1.0}, "reward": {"functions": [
            {"name": "remote", "kwargs": {"url": url, "headers": {"Authorization": f"Bearer {key}"}}}]}}

    path = checkpoint.save(tmp_path / "checkpoints", 1, {"w": torch.zeros(1)}, {}, config())
    assert "sk-live-123" not in (path / "fingerprint.json").read_text()
    checkpoint.load(path, config(key="sk-rotated-456"))  # a new API key is no reason to refuse the resume
    with pytest.raises(checkpoint.ResumeError, match="reward.functions"):
        checkpoint.load(path, config(url="http://elsewhere/score"))
