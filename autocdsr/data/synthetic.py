"""The embedded default dataset: three domains with planted positive and negative transfer.

Every user has a hidden topic z and a cursor c that advances around a ring of RING slots.
- Domain 0, the *target* (sparse, 20 % of events): item (z, c) after the cursor advances, so
  its own history gives the topic but often a stale slot.
- Domain 1, the *positive source* (dense, 40 %): item (z, c) of its own item set, advancing
  the same cursor, so attending to it tells the target the current slot (positive transfer).
- Domain 2, the *spurious source* (dense, 40 %): items that name a slot. In the training part
  of a sequence (every event whose item two steps later is a training target), an event of this
  domain names the slot of the item two steps later: a shortcut that fits the training data
  better than the cursor (it even predicts the 5 % of slot flips). In the last events (those
  whose item two steps later is the validation or test target) its items are uniformly random,
  so a model that learnt the shortcut is misled exactly at evaluation (negative transfer by
  construction; the correlation holds in training only).

The oracle knows z, c and that the spurious domain is random at evaluation; `oracle_table`
scores each evaluation target under the oracle's predictive distribution, the ceiling any
model can reach (HR@10 under full ranking).
"""
from collections import namedtuple

import numpy as np
import pyarrow as pa

NUM_TOPICS = 30
RING = 8
COPIES = 15            # spurious-domain items per named slot
DOMAIN_PROBS = (0.2, 0.4, 0.4)
FLIP = 0.05            # probability that a target / positive-source item takes a random slot

# what the generator knows: per user token a state, and scores(index, state, "valid" | "test")
# -> [num_items + 1] probabilities of that target under the generator
Oracle = namedtuple("Oracle", "states scores")


def _item(domain, topic, slot, copy=0):
    if domain == 2:
        return f"s{slot}_{copy}"
    return f"d{domain}_t{topic}_{slot}"


def generate(num_users=3000, min_len=20, max_len=60, seed=0, spurious=True):
    """Return an interaction frame as read_inter returns it (tokens as strings), with an extra
    "oracle" entry: per user, (topic, cursor before the valid target, cursor before the test
    target), for oracle_table. spurious=False makes the spurious domain random everywhere
    (the control that shows what the shortcut costs the base model)."""
    rng = np.random.default_rng(seed)
    sequences, oracle = [], {}
    for u in range(num_users):
        topic, cursor = int(rng.integers(NUM_TOPICS)), int(rng.integers(RING))
        length = int(rng.integers(min_len, max_len + 1))
        seq_domains = rng.choice(3, size=length, p=DOMAIN_PROBS)
        slots = np.zeros(length, dtype=np.int64)
        cursors = np.zeros(length, dtype=np.int64)  # cursor before event t
        for t, d in enumerate(seq_domains):
            cursors[t] = cursor
            if d != 2:
                cursor = (cursor + 1) % RING
                slots[t] = cursor if rng.random() > FLIP else int(rng.integers(RING))
        seq_items = []
        for t, d in enumerate(seq_domains):
            if d != 2:
                seq_items.append(_item(d, topic, slots[t]))
                continue
            ahead = t + 2
            if spurious and ahead <= length - 3 and seq_domains[ahead] != 2:  # a training target
                named = slots[ahead]
            else:
                named = int(rng.integers(RING))
            seq_items.append(_item(2, topic, named, int(rng.integers(COPIES))))
        oracle[f"u{u}"] = (topic, int(cursors[length - 2]), int(cursors[length - 1]))
        sequences.append((seq_items, seq_domains))
    return as_frame(sequences, Oracle(oracle, default_oracle_scores))


def as_frame(sequences, oracle):
    """The frame read_inter would return for [(items, domains)] per user u0, u1, ... (event
    positions as timestamps), with the generator's oracle beside it."""
    users = [f"u{u}" for u, (items, _) in enumerate(sequences) for _ in items]
    return {"user": pa.chunked_array([pa.array(users)]),
            "item": pa.chunked_array([pa.array([i for items, _ in sequences for i in items])]),
            "domain": np.concatenate([d for _, d in sequences]).astype(np.int64),
            "timestamp": np.concatenate([np.arange(len(d)) for _, d in sequences]).astype(np.float64),
            "oracle": oracle}


def oracle_scores(index, topic, cursor, probs=DOMAIN_PROBS):
    """[num_items + 1] probabilities (column 0 = padding) of the next event under the oracle;
    index maps item tokens to dense ids; probs: each domain's share of events."""
    scores = np.zeros(len(index) + 1)
    for domain in (0, 1):
        for slot in range(RING):
            p = probs[domain] * (FLIP / RING + (1 - FLIP) * (slot == (cursor + 1) % RING))
            i = index.get(_item(domain, topic, slot))
            if i is not None:
                scores[i] = p
    for slot in range(RING):
        for copy in range(COPIES):
            i = index.get(_item(2, topic, slot, copy))
            if i is not None:
                scores[i] = probs[2] / (RING * COPIES)
    return scores


def default_oracle_scores(index, state, which):
    """oracle_scores of one user's oracle state for its "valid" or "test" target."""
    return oracle_scores(index, state[0], state[1 if which == "valid" else 2])


def oracle_table(data, split, oracle, which, know_domain=False, seed=0):
    """[len(split), num_items + 1] oracle scores of each row's target (column 0 = padding),
    to score like a model under any protocol. oracle: the generator's Oracle; which: "valid"
    or "test".

    know_domain: condition on the target's domain (a BERT4Rec whose appended [MASK] carries
    the target's domain knows it too). A tiny seeded jitter breaks the ties between equally
    likely items in a fixed random order, as any scorer has to: so the oracle's HR@K is the
    best a predictor can expect (the top K most probable items), not a tie-counting artefact.
    """
    index = {tok: i + 1 for i, tok in enumerate(data.item_tokens)}
    table = np.zeros((len(split), data.num_items + 1))
    domain_of = np.zeros(data.num_items + 1, dtype=np.int64)
    for d, pool in enumerate(data.domain_items):
        domain_of[pool] = d
    for r, user in enumerate(split.users):
        table[r] = oracle.scores(index, oracle.states[user], which)
        if know_domain:
            table[r] = np.where(domain_of == split.target_domains[r], table[r], 0.0)
    jitter = np.random.default_rng(seed).random(table.shape[1]) * 1e-7  # << any gap between levels
    return (table + jitter[None]).astype(np.float64)
