"""Batches built ahead on a thread are the batches built in place, in order; a failure while
building one surfaces at that batch; training with and without prefetching is identical."""
import numpy as np
import pytest
import torch

from autocdsr.config import load_config
from autocdsr.data.prefetch import prefetched
from autocdsr.train import Trainer, train


def _make(i):
    rng = np.random.default_rng([7, i])
    return {"x": torch.from_numpy(rng.integers(0, 100, size=(4, 3))), "i": torch.tensor(i)}


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_prefetched_batches_equal_direct_ones_in_order(depth):
    got = list(prefetched(_make, range(3, 9), depth))
    assert [int(b["i"]) for b in got] == list(range(3, 9))
    for batch in got:
        assert torch.equal(batch["x"], _make(int(batch["i"]))["x"])


def test_a_failure_surfaces_at_its_batch():
    def make(i):
        if i == 4:
            raise KeyError("row 4")
        return _make(i)
    seen = []
    with pytest.raises(KeyError, match="row 4"):
        for batch in prefetched(make, range(8), depth=3):
            seen.append(int(batch["i"]))
    assert seen == [0, 1, 2, 3]


def test_training_with_and_without_prefetch_is_identical(tmp_path):
    metrics = []
    for depth in (0, 3):
        cfg = load_config(None, ["data.synthetic_users=120", "data.max_len=12", "model.hidden=32",
                                 "model.arch=bert4rec", "train.batch_size=16", "train.epochs=1",
                                 "objective=autocdsr", "eval.protocol=uni100_vocab",
                                 f"train.prefetch={depth}", f"run_dir={tmp_path / str(depth)}"])
        metrics.append(train(cfg))
    assert metrics[0]["test"] == metrics[1]["test"]
    assert metrics[0]["history"][0]["train_loss"] == metrics[1]["history"][0]["train_loss"]


def test_cuda_graph_on_the_cpu_is_refused_before_loading_data(tmp_path):
    cfg = load_config(None, ["train.cuda_graph=true", "train.device=cpu",
                             "data.path=" + str(tmp_path / "absent"), f"run_dir={tmp_path}"])
    with pytest.raises(ValueError, match="train.cuda_graph"):
        Trainer(cfg)
