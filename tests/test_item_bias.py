"""model.item_bias: score = h . e + b in the losses, at evaluation and in exported vectors;
log_count starts the bias at the training popularity's ranking."""
import pytest
import torch
import torch.nn.functional as F

from autocdsr.config import ConfigError, load_config
from autocdsr.evaluate import popularity_scorer
from autocdsr.losses import recommendation_loss
from autocdsr.train import Trainer

TINY = ["data.synthetic_users=80", "data.max_len=12", "model.hidden=32", "train.batch_size=16",
        "eval.protocol=uni100_vocab", "train.warmup_steps=2", "train.epochs=1"]


def _loss_case():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, generator=gen)
    weights, bias = torch.randn(30, 8, generator=gen), torch.randn(30, generator=gen)
    targets = torch.randint(1, 30, (2, 5), generator=gen)
    slots = torch.arange(10)
    return hidden, weights, bias, targets, slots, torch.ones(10)


def test_full_and_sampled_losses_add_the_bias_to_every_logit():
    hidden, weights, bias, targets, slots, w = _loss_case()
    states, flat = hidden.reshape(10, 8), targets.reshape(10)
    full = recommendation_loss("full", hidden, weights, targets, slots, w, bias=bias)
    assert torch.allclose(full, F.cross_entropy(states @ weights.T + bias, flat), atol=1e-6)
    torch.manual_seed(3)
    sampled = recommendation_loss("sampled", hidden, weights, targets, slots, w,
                                  num_negatives=7, bias=bias)
    torch.manual_seed(3)
    negatives = torch.randint(1, 30, (7,))
    logits = torch.cat([(states * weights[flat]).sum(-1, keepdim=True) + bias[flat, None],
                        states @ weights[negatives].T + bias[negatives]], dim=1)
    logits[:, 1:] = logits[:, 1:].masked_fill(negatives[None] == flat[:, None], float("-inf"))
    want = F.cross_entropy(logits, torch.zeros(10, dtype=torch.long))
    assert torch.allclose(sampled, want, atol=1e-6)
    without = recommendation_loss("full", hidden, weights, targets, slots, w)
    assert not torch.allclose(full, without)


@pytest.mark.parametrize("extra", [["train.loss=inbatch_official"], ["train.logits=cosine"]])
def test_an_item_bias_needs_dot_product_scores(extra):
    with pytest.raises(ConfigError, match="item_bias"):
        load_config(None, ["model.item_bias=zero", *extra])


def test_log_count_bias_alone_ranks_like_most_popular(tmp_path):
    cfg = load_config(None, TINY + ["model.item_bias=log_count", f"run_dir={tmp_path}"])
    trainer = Trainer(cfg)
    with torch.no_grad():
        trainer.model.item_embedding.weight.zero_()  # scores are the bias alone
    model_metrics = trainer.evaluate(trainer.data.test, "test")
    popular = trainer.evaluate(trainer.data.test, "mostpop",
                               popularity_scorer(trainer.data.popularity, trainer.device))
    assert model_metrics["overall"] == popular["overall"]
    assert popular["overall"]["HR@10"] > 0

