"""Build the next training batches on a background thread while the device runs this step.

Batches are pure functions of (epoch, index) (BERT4Rec's masking draws from a generator seeded
by both), so building them ahead changes nothing in what a run computes or in how it resumes.
On CUDA the host tensors are placed in pinned memory, so their copy to the device is
asynchronous (to_device uses non_blocking=True): the copy of batch i + 1 overlaps step i.
"""
from concurrent.futures import ThreadPoolExecutor


def prefetched(make_batch, indices, depth=2, pin=False):
    """Yield make_batch(i) for i in indices, computing up to `depth` ahead on one thread.
    An exception raised while building a batch is raised here, at that batch."""
    indices = list(indices)

    def build(i):
        batch = make_batch(i)
        return {k: v.pin_memory() for k, v in batch.items()} if pin else batch

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="autocdsr-batches") as pool:
        pending = [pool.submit(build, i) for i in indices[:depth]]
        for position in range(len(indices)):
            batch = pending.pop(0).result()
            ahead = position + depth
            if ahead < len(indices):
                pending.append(pool.submit(build, indices[ahead]))
            yield batch
        # a consumer that stops early (an exception in the step) leaves at most `depth`
        # batches to finish: the pool's shutdown waits for them
