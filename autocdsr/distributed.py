"""Data parallelism (torchrun): one process per device, the global batch split by rows.

`torchrun --nproc_per_node N -m autocdsr train ...` sets RANK / WORLD_SIZE / LOCAL_RANK;
init() joins the group (nccl on CUDA, gloo on CPU, collectives time out after
AUTOCDSR_DIST_TIMEOUT seconds, default 600, so a failed rank ends the job instead of hanging
it). `train.batch_size` is the *global* batch: every rank builds the same global batch and
keeps rows rank, rank + N, ... (batch_size must be divisible by N), so a run on N processes
sees exactly the rows of a single-process run with the same settings.

Exactness: the losses are normalised by global counts (all-reduced), so the sum over ranks of
the per-rank gradients is the gradient of the single-process loss over the union batch. The
balanced step all-reduces the Gram parameters' parts of g_rec and g_cd and the two losses in
one flat buffer, so every rank computes the same Gram matrix and lambda from the global
gradients; then the combined gradient of every parameter is all-reduced once. Communication
per step: plain data parallelism (every gradient once) plus twice the Gram set on solver steps.
No DDP wrapper is used: the per-task gradients come from torch.autograd.grad, where DDP's hooks
would not fire, and every reduction is an explicit, counted collective.
"""
import datetime
import os

import torch
import torch.distributed as dist

BUCKET_ELEMENTS = 1 << 24  # per all-reduce, so a 1M-item table is sent in a few pieces


class Comm:
    """The group this process trains in (a world of 1 when not launched by torchrun), with a
    running count of the bytes it all-reduced."""

    def __init__(self, rank=0, world=1, owns_group=False):
        self.rank, self.world, self.bytes = rank, world, 0
        self.owns_group = owns_group  # init() joined it, so close() leaves it

    @property
    def active(self):
        return self.world > 1

    @property
    def main(self):
        return self.rank == 0

    def sum_(self, tensors):
        """All-reduce (sum) a list of tensors in place, bucketed into flat buffers."""
        if not self.active or not tensors:
            return tensors
        for dtype in {t.dtype for t in tensors}:
            group = [t for t in tensors if t.dtype == dtype]
            start = 0
            while start < len(group):
                size, end = 0, start
                while end < len(group) and (end == start or size + group[end].numel() <= BUCKET_ELEMENTS):
                    size += group[end].numel()
                    end += 1
                bucket = group[start:end]
                flat = torch.cat([t.reshape(-1) for t in bucket])
                dist.all_reduce(flat)
                self.bytes += flat.numel() * flat.element_size()
                torch._foreach_copy_(bucket, [f.view_as(t) for f, t in
                                              zip(flat.split([t.numel() for t in bucket]), bucket)])
                start = end
        return tensors

    def summed(self, tensors):
        """Summed copies (the inputs are left as they are)."""
        return self.sum_([t.detach().clone() for t in tensors])

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's obj on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        """Wait for every process (no-op in one process)."""
        if self.active:
            dist.barrier()

    def close(self, clean=True):
        """Leave the group. After a clean run every rank first waits for the others, so none
        tears its transport down while a peer still talks to it; left to interpreter exit, the
        gloo threads can be destroyed while running and abort the process."""
        if self.active and self.owns_group and dist.is_initialized():
            if clean:
                dist.barrier()
            dist.destroy_process_group()


def init(device_name="auto"):
    """(Comm, device): joins the torchrun group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Comm(), None
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        timeout = datetime.timedelta(seconds=float(os.environ.get("AUTOCDSR_DIST_TIMEOUT", 600)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return Comm(rank, world, owns), device
