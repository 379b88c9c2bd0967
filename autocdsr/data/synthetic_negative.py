"""The negative-transfer mode of the synthetic data (data.synthetic_mode=negative): the
default data's positive transfer, plus a domain that a cross-domain model is hurt on.

- Domains 0 and 1 as in the default data: the sparse target (0) needs the dense positive
  source (1) to know the current slot of the shared cursor (positive transfer).
- Domain 3, the *hurt* domain, self-contained: its own topic and its own cursor on a ring of
  RING3 slots, advanced by each of its own events; an item takes the cursor's slot, or a random
  slot with probability FLIP3. Its own history predicts it: a model trained on domain 3 alone
  can put the right item first for about 1 - FLIP3 + FLIP3 / RING3 of its targets.
- Domain 2, the *hint* source: each event names the slot of the first domain-3 event at least
  two positions later (so a causal model has to attend back to it) — exactly, even a flipped
  slot, while that event is a training target; at random when it is the validation or test
  target (or when no domain-3 event follows). In training a hint is never wrong and beats the
  hurt domain's own history, so a cross-domain model learns to follow it; at evaluation it
  then follows a random slot. That is negative transfer in the usual sense: the cross-domain
  model does worse on domain 3's targets than the same model trained on domain 3 alone
  (`data.domains=[3] data.shared_targets=true` scores it on the same targets).
"""
import numpy as np

from .synthetic import FLIP, NUM_TOPICS, RING, Oracle, _item, as_frame, oracle_scores

DOMAIN_PROBS = (0.2, 0.3, 0.25, 0.25)
RING3 = 16        # slots of the hurt domain's own ring
FLIP3 = 0.3       # probability that a hurt-domain item takes a random slot
HINT_COPIES = 15  # hint items per named slot


def _hurt_item(topic, slot):
    return f"h_t{topic}_{slot}"


def _hint_item(slot, copy):
    return f"x{slot}_{copy}"


def generate_negative(num_users=3000, min_len=20, max_len=60, seed=0):
    """An interaction frame as read_inter returns it, with an "oracle" entry (an Oracle whose
    state per user is (topic, cursor before the valid / test target, domain 3's topic, its
    cursor before the valid / test target))."""
    rng = np.random.default_rng(seed)
    sequences, oracle = [], {}
    for u in range(num_users):
        topic, cursor = int(rng.integers(NUM_TOPICS)), int(rng.integers(RING))
        topic3, cursor3 = int(rng.integers(NUM_TOPICS)), int(rng.integers(RING3))
        length = int(rng.integers(min_len, max_len + 1))
        seq_domains = rng.choice(4, size=length, p=DOMAIN_PROBS)
        slots = np.zeros(length, dtype=np.int64)
        cursors = np.zeros((length, 2), dtype=np.int64)  # (shared, domain 3's) before event t
        for t, d in enumerate(seq_domains):
            cursors[t] = cursor, cursor3
            if d in (0, 1):
                cursor = (cursor + 1) % RING
                slots[t] = cursor if rng.random() > FLIP else int(rng.integers(RING))
            elif d == 3:
                cursor3 = (cursor3 + 1) % RING3
                slots[t] = cursor3 if rng.random() > FLIP3 else int(rng.integers(RING3))
        hurt = np.flatnonzero(seq_domains == 3)
        seq_items = []
        for t, d in enumerate(seq_domains):
            if d in (0, 1):
                seq_items.append(_item(d, topic, slots[t]))
            elif d == 3:
                seq_items.append(_hurt_item(topic3, slots[t]))
            else:
                later = hurt[hurt >= t + 2]
                named = slots[later[0]] if len(later) and later[0] <= length - 3 \
                    else int(rng.integers(RING3))  # the named event is a valid / test target
                seq_items.append(_hint_item(named, int(rng.integers(HINT_COPIES))))
        oracle[f"u{u}"] = (topic, int(cursors[length - 2, 0]), int(cursors[length - 1, 0]),
                            topic3, int(cursors[length - 2, 1]), int(cursors[length - 1, 1]))
        sequences.append((seq_items, seq_domains))
    return as_frame(sequences, Oracle(oracle, negative_oracle_scores))


def negative_oracle_scores(index, state, which):
    """[num_items + 1] probabilities of the next event under the oracle (which: "valid" or
    "test"); hints at evaluation are random, so the oracle ignores them."""
    topic, cursor, topic3, cursor3 = (state[0], state[1 if which == "valid" else 2],
                                      state[3], state[4 if which == "valid" else 5])
    scores = oracle_scores(index, topic, cursor, (*DOMAIN_PROBS[:2], 0.0))
    for slot in range(RING3):
        i = index.get(_hurt_item(topic3, slot))
        if i is not None:
            scores[i] = DOMAIN_PROBS[3] * (FLIP3 / RING3 + (1 - FLIP3) * (slot == (cursor3 + 1) % RING3))
        for copy in range(HINT_COPIES):
            i = index.get(_hint_item(slot, copy))
            if i is not None:
                scores[i] = DOMAIN_PROBS[2] / (RING3 * HINT_COPIES)
    return scores
