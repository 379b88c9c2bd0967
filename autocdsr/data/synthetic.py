"""The embedded default dataset: multi-domain sequences with planted structure.

Three domains. Domains 0 and 1 are predictive: every user follows a hidden topic, and the
items of both domains advance one shared cursor around that topic's ring of items, so the
next item in either domain is determined by the latest item of *either* domain (cross-domain
transfer helps). Domain 2 is pure noise: uniformly random items that carry no information,
so attending to it can only hurt (negative transfer). A little noise keeps it realistic.
"""
import numpy as np
import pyarrow as pa

NUM_TOPICS = 40
RING = 8               # items per topic per predictive domain
NOISE_ITEMS = 300
DOMAIN_PROBS = (0.35, 0.3, 0.35)   # predictive, predictive, noise


def generate(num_users=3000, min_len=20, max_len=60, seed=0, flip=0.05):
    """Return an interaction frame as read_inter returns it (tokens as strings)."""
    rng = np.random.default_rng(seed)
    users, items, domains, times = [], [], [], []
    for u in range(num_users):
        topic = rng.integers(NUM_TOPICS)
        cursor = rng.integers(RING)
        length = rng.integers(min_len, max_len + 1)
        seq_domains = rng.choice(3, size=length, p=DOMAIN_PROBS)
        for t, d in enumerate(seq_domains):
            if d == 2:
                item = f"n{rng.integers(NOISE_ITEMS)}"
            else:
                cursor = (cursor + 1) % RING
                slot = cursor if rng.random() > flip else rng.integers(RING)
                item = f"d{d}_t{topic}_{slot}"
            users.append(f"u{u}")
            items.append(item)
            domains.append(int(d))
            times.append(float(t))
    return {"user": pa.chunked_array([pa.array(users)]),
            "item": pa.chunked_array([pa.array(items)]),
            "domain": np.asarray(domains, dtype=np.int64),
            "timestamp": np.asarray(times, dtype=np.float64)}
