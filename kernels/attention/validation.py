"""Input checks shared by every attention backend: fail before any kernel launches."""
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128


def _tracing(t):
    return torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_attention_inputs(q, k, v, domains, causal, num_bottleneck, seq_lens, scale):
    """Raise a ValueError naming the offending argument; return nothing on success."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, L, D], got {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    batch, _, length, head_dim = q.shape
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q head dim D must be in {MIN_HEAD_DIM}..{MAX_HEAD_DIM}, got {head_dim}")
    if not isinstance(domains, torch.Tensor) or domains.dtype.is_floating_point \
            or domains.dtype == torch.bool or domains.is_complex():
        raise ValueError("domains must be an integer tensor of shape [B, L]")
    if tuple(domains.shape) != (batch, length):
        raise ValueError(f"domains must have shape [B, L] = {(batch, length)}, got {tuple(domains.shape)}")
    if domains.device != q.device:
        raise ValueError(f"domains must be on q's device {q.device}, got {domains.device}")
    if domains.dtype != torch.int32 and domains.numel() and not _tracing(domains):
        # the kernels read int32 ids: a wider id would wrap silently. (A read of the values:
        # a host sync on CUDA, which int32 domains, as the model passes them, never need.)
        info = torch.iinfo(torch.int32)
        if domains.max() > info.max or domains.min() < info.min:
            raise ValueError(f"domains must fit in int32 ({info.min}..{info.max}); got values "
                             f"in {int(domains.min())}..{int(domains.max())}")
    if seq_lens is not None:
        if not isinstance(seq_lens, torch.Tensor) or seq_lens.dtype.is_floating_point \
                or seq_lens.dtype == torch.bool:
            raise ValueError("seq_lens must be an integer tensor of shape [B] or None")
        if tuple(seq_lens.shape) != (batch,):
            raise ValueError(f"seq_lens must have shape [B] = ({batch},), got {tuple(seq_lens.shape)}")
        if seq_lens.device != q.device:
            raise ValueError(f"seq_lens must be on q's device {q.device}, got {seq_lens.device}")
    if not isinstance(num_bottleneck, int) or isinstance(num_bottleneck, bool) \
            or not 0 <= num_bottleneck <= length:
        raise ValueError(f"num_bottleneck must be an int in 0..L={length}, got {num_bottleneck!r}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")
