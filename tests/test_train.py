"""End to end on tiny synthetic data: training, outputs, resume after SIGKILL, safe loading."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from autocdsr.checkpoint import CheckpointError, load_safe
from autocdsr.config import load_config
from autocdsr.train import train

TINY = ["data.synthetic_users=120", "data.max_len=16", "model.hidden=32", "model.layers=2",
        "train.batch_size=16", "eval.protocol=uni100_vocab", "train.warmup_steps=5"]


@pytest.mark.parametrize("extra", [
    ["model.arch=sasrec", "objective=base"],
    ["model.arch=sasrec", "objective=autocdsr", "train.loss=sampled", "train.num_negatives=50",
     "train.domain_balance=1.0"],
    ["model.arch=bert4rec", "objective=base", "train.loss=sampled", "train.num_negatives=20",
     "train.negatives=mixed", "data.domain_views=true", "data.train_windows=true"],
    ["model.arch=bert4rec", "objective=autocdsr", "weighting.mode=mgda", "train.loss=inbatch"],
    ["model.arch=bert4rec", "objective=autocdsr_plus", "weighting.every=2"],
    ["model.arch=sasrec", "objective=autocdsr", "weighting.mode=fixed", "weighting.lam=0.5",
     "attention.backend=reference"],
])
def test_train_writes_the_run_directory(tmp_path, extra):
    cfg = load_config(None, TINY + extra + ["train.epochs=2", f"run_dir={tmp_path}"])
    metrics = train(cfg)
    for name in ("config.yaml", "metrics.json", "best.pt", "last.pt", "train.log", "environment.json"):
        assert (tmp_path / name).exists(), name
    stored = json.loads((tmp_path / "metrics.json").read_text())
    assert stored["protocol"] == "uni100_vocab" and stored["seed"] == 0
    for split in ("valid", "test"):
        assert {"HR@10", "NDCG@10", "MRR"} <= set(stored[split]["overall"])
        assert set(stored[split]["per_domain"]) <= {"0", "1", "2"}
    history = stored["history"]
    assert len(history) == 2 and all(h["train_loss"] == h["train_loss"] for h in history)
    if "objective=autocdsr" in extra and "weighting.mode=fixed" not in extra:
        assert any(h["lambda"] != 0.0 for h in history)
    assert metrics["test"] == stored["test"]


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "autocdsr.cli", *args], **kw)


def test_resume_after_sigkill_gives_the_same_metrics(tmp_path):
    common = TINY + ["train.epochs=3", "train.checkpoint_every=4", "objective=autocdsr",
                     "data.synthetic_users=160"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert _cli("train", *common, f"run_dir={full}").wait(timeout=600) == 0

    proc = _cli("train", *common, f"run_dir={killed}", stderr=subprocess.DEVNULL)
    last = killed / "last.pt"
    deadline = time.time() + 600
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists(), "the run finished before it was killed"
    state = load_safe(str(last))
    assert state["epoch"] < 3
    assert _cli("train", "--resume", str(killed)).wait(timeout=600) == 0

    a = json.loads((full / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    for split in ("valid", "test"):
        for key, value in a[split]["overall"].items():
            assert abs(value - b[split]["overall"][key]) <= 1e-6, (split, key)
    assert [h["train_loss"] for h in a["history"]] == pytest.approx(
        [h["train_loss"] for h in b["history"]], abs=1e-6)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_with_pickled_payload_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_safe(str(path))
    proc = _cli("evaluate", "--checkpoint", str(path), stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "refused to load" in err


def test_bad_config_exits_with_a_message():
    proc = _cli("train", "model.depth=2", stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "unknown config key 'model.depth'" in err


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, monkeypatch):
    import autocdsr.step as step_module
    import autocdsr.train as train_module
    real = step_module.recommendation_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 4 else loss

    monkeypatch.setattr(step_module, "recommendation_loss", sometimes_nan)
    cfg = load_config(None, TINY + ["train.epochs=3", "train.max_bad_steps=3",
                                    "train.checkpoint_every=2", "objective=autocdsr",
                                    "weighting.log_every=1", f"run_dir={tmp_path}"])
    trainer = train_module.Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(FloatingPointError, match="3 non-finite steps in a row"):
        trainer.fit()
    assert trainer.skipped_steps == 3
    state = load_safe(str(tmp_path / "last.pt"))  # the last checkpoint survives, finite
    assert 2 <= state["global_step"] < trainer.global_step + 1
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    for value in trainer.model.state_dict().values():  # NaN never reached the weights
        assert torch.isfinite(value).all()
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_reevaluated_checkpoint_is_a_run_folder_compare_reads(tmp_path):
    from autocdsr.compare import load_run
    from autocdsr.reevaluate import reevaluate
    run = tmp_path / "run"
    train(load_config(None, TINY + ["train.epochs=1", f"run_dir={run}"]))
    trained = json.loads((run / "metrics.json").read_text())
    same = reevaluate(str(run / "best.pt"), [], str(tmp_path / "same"), device="cpu",
                      log=lambda text: None)
    for key, value in trained["test"]["overall"].items():  # same checkpoint, same draw
        assert same["test"]["overall"][key] == pytest.approx(value, abs=1e-6), key
    assert same["best_epoch"] == trained["best_epoch"] and same["objective"] == "base"
    more = reevaluate(str(run / "best.pt"), ["eval.negative_draws=3"], str(tmp_path / "more"),
                      device="cpu", log=lambda text: None)
    assert more["negative_draws"] == 3 and more["test"] != trained["test"]
    cfg, metrics = load_run(str(tmp_path / "more"))
    assert cfg.eval.negative_draws == 3 and metrics["test"] == more["test"]


def test_an_older_last_pt_resumes_under_the_current_stat_names():
    from autocdsr.train import _current_name
    assert [_current_name(k) for k in ("loss", "cd", "lam", "cos", "lam@2", "cos@0", "n")] == \
        ["train_loss", "cd_mass", "lambda", "cosine", "lambda@2", "cosine@0", "n"]
