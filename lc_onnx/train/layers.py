"""The layers a site is made of, as affine maps: nn.Linear, HF Conv1D and pointwise nn.Conv1d/2d/3d (kernel 1,
stride 1, no padding, one group: a linear layer over the channel dim), and the eval-mode BatchNorm between
them. Matching lives in `sites`; this is only the arithmetic (as torch keeps `fuse_conv_bn_weights` apart)."""

from __future__ import annotations

import torch
from torch import nn

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# SyncBatchNorm (what convert_sync_batchnorm makes) syncs batch statistics in training only; with running stats in
# eval it calls F.batch_norm as BatchNorm does, on any rank >= 2, normalizing dim 1
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def is_pointwise_conv(m: nn.Module) -> bool:
    """Kernel 1 everywhere, stride 1, no padding (so padding_mode never pads), one group: dilation then
    touches nothing, and the conv is a linear map of each position's channels."""
    return (isinstance(m, CONVS) and all(k == 1 for k in m.kernel_size) and all(s == 1 for s in m.stride)
            and m.groups == 1 and (m.padding in ("valid", "same") or all(p == 0 for p in m.padding)))


def is_dense(m: nn.Module) -> bool:
    """nn.Linear or HF Conv1D (`y = x·W + b`, weight stored transposed): a map of the last dim."""
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def _own_forward(m: nn.Module) -> bool:
    """A subclass of a layer class that overrides its forward (or, for a ConvNd, `_conv_forward`)."""
    cls = type(m)
    if isinstance(m, nn.Linear):
        return cls.forward is not nn.Linear.forward
    if isinstance(m, CONVS):
        base = next(c for c in CONVS if isinstance(m, c))
        return cls.forward is not base.forward or cls._conv_forward is not base._conv_forward
    if isinstance(m, nn.SyncBatchNorm):
        return cls.forward is not nn.SyncBatchNorm.forward
    if isinstance(m, BATCHNORMS):
        return cls.forward is not nn.modules.batchnorm._BatchNorm.forward
    return is_dense(m) and cls.forward.__qualname__ != "Conv1D.forward"  # HF Conv1D, a class of its own


def extra_state(m: nn.Module) -> list[str]:
    """A layer subclass whose own forward reads state beyond its class's (weight, bias, BatchNorm's stats): what
    it computes is not its weights' map, and may move off it as that state trains (loralib's LoRA Linear: an
    adapter path `x·Aᵀ·Bᵀ·s` with B = 0 at first, so a recorded pass sees the weights' map), and collapse would
    fold the weights alone. The names of that state; [] for a class's own forward, or one that reads only the
    class's own state (Falcon's FalconLinear, `x @ W.T + b`: the recorded pass proves it is the map)."""
    if not _own_forward(m):
        return []
    base = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    return [n for n in (*m._parameters, *m._buffers) if n not in base] + [
        n for n in m._modules if n != "parametrizations"]


def is_linear(m: nn.Module) -> bool:
    """nn.Linear, HF Conv1D or a pointwise Conv1d/2d/3d, not a subclass whose forward reads more state."""
    return (is_dense(m) or is_pointwise_conv(m)) and not extra_state(m)


def kind(m: nn.Module) -> str:
    """Layers of one kind map the same dim of tensors of the same rank: "dense" (the last dim), or "conv1d",
    "conv2d", "conv3d" (the channels of a batched input, dim 1)."""
    return f"conv{len(m.kernel_size)}d" if isinstance(m, CONVS) else "dense"


def feature_dim(m: nn.Module) -> int:
    """The dim a linear layer maps: the last for Linear and Conv1D, the channels for a convolution."""
    return 1 if isinstance(m, CONVS) else -1


def out_features(m: nn.Module) -> int:
    if isinstance(m, CONVS):
        return m.out_channels
    return m.out_features if isinstance(m, nn.Linear) else m.nf


def in_features(m: nn.Module) -> int:
    if isinstance(m, CONVS):
        return m.in_channels
    return m.in_features if isinstance(m, nn.Linear) else m.weight.shape[0]


def norm_fits(norm: nn.Module, rank: int, dim: int) -> bool:
    """Whether a BatchNorm seen on a rank-`rank` input normalizes the layers' feature dim `dim` (its channels
    are dim 1): BatchNorm1d on (N, C) after a Linear or on (N, C, L) after a pointwise Conv1d, BatchNorm2d on
    (N, C, H, W) after a Conv2d, BatchNorm3d on (N, C, D, H, W) after a Conv3d; a SyncBatchNorm where any of these
    fits. BatchNorm1d on a Linear's (N, T, C) output normalizes T, not the features."""
    if isinstance(norm, nn.SyncBatchNorm):
        return rank == 2 and dim == -1 or rank >= 3 and dim == 1
    if isinstance(norm, nn.BatchNorm1d):
        return rank == 2 and dim == -1 or rank == 3 and dim == 1
    if isinstance(norm, nn.BatchNorm2d):
        return rank == 4 and dim == 1
    return isinstance(norm, nn.BatchNorm3d) and rank == 5 and dim == 1


def affine(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) in float64 with y = W·x + b over the feature dim."""
    if is_batchnorm(m):
        mean = m.running_mean if m.running_mean is not None else torch.zeros(m.num_features)
        var = m.running_var if m.running_var is not None else torch.ones(m.num_features)
        scale = 1.0 / torch.sqrt(var.double() + m.eps)
        if m.affine:
            scale = scale * m.weight.double()
        shift = -mean.double() * scale + (m.bias.double() if m.affine else 0.0)
        return torch.diag(scale), shift
    if type(m).__name__ == "Conv1D":
        return m.weight.double().T, m.bias.double()
    w = m.weight.double().reshape(m.weight.shape[0], -1)  # Linear (out, in); ConvNd (out, in, 1, ...)
    b = m.bias.double() if m.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return w, b


def fused(w: torch.Tensor, b: torch.Tensor, like: nn.Module) -> nn.Module:
    """One layer computing W·x + b, of the second layer's kind, device and dtype."""
    ref = like.weight
    if isinstance(like, CONVS):
        conv = next(c for c in CONVS if isinstance(like, c))  # torch's own class, not a subclass's forward
        layer = conv(w.shape[1], w.shape[0], 1, device=ref.device, dtype=ref.dtype)
        w = w.reshape(*w.shape, *like.kernel_size)  # kernel (1, ...)
    else:
        layer = nn.Linear(w.shape[1], w.shape[0], device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        layer.weight.copy_(w.to(ref.dtype))
        layer.bias.copy_(b.to(ref.dtype))
    layer.lc_fused = True  # what `collapse` made: the next block of a chain takes it as its first layer
    return layer


def is_batchnorm(m: nn.Module) -> bool:
    return isinstance(m, BATCHNORMS) and not extra_state(m)


def map_dim(m: nn.Module, x: torch.Tensor) -> int | None:
    """The dim of `x` that `m` maps: the last for Linear/Conv1D, the channels (1) for a BatchNorm, and for a
    ConvNd the channels of a batched input only (N, C, *N spatial dims). An unbatched conv input is no site:
    torch's per-channel PReLU would take its dim 1, which is not the channels there."""
    if is_dense(m):
        return -1
    if isinstance(m, CONVS):
        return 1 if x.dim() == len(m.kernel_size) + 2 else None
    return 1


@torch.no_grad()
def reproduces(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether `y` is what `affine(m)` maps `x` to, i.e. what `collapse` would fold. A forward hook, a
    subclass's own forward or a BatchNorm without running stats (it uses the batch's) makes it something else."""
    if is_batchnorm(m) and (m.running_mean is None or m.running_var is None):
        return False
    if not (x.is_floating_point() and y.is_floating_point()):
        return False
    dim = map_dim(m, x)
    if dim is None:
        return False
    w, b = affine(m)
    try:
        want = torch.movedim(torch.movedim(x.double(), dim, -1) @ w.to(x.device).T + b.to(x.device), -1, dim)
    except RuntimeError:  # shapes the layer's own forward handled differently: not the map collapse folds
        return False
    if want.shape != y.shape:
        return False
    lowest = min(x.dtype, y.dtype, key=lambda d: torch.finfo(d).bits)
    tol = tolerance(m, lowest, y.device)
    return float((y.double() - want).norm()) <= tol * float(want.norm()) + 1e-12


def _fp32_precision(device: torch.device, conv: bool) -> str:
    """How float32 matmuls (convolutions with `conv`) may run on `device`: "ieee", "tf32" or "bf16". Read from
    torch's `fp32_precision` flags, op first, then backend, then global ("none": inherit), which `allow_tf32 = ...`
    and `set_float32_matmul_precision` also set; reading `allow_tf32` itself raises once both APIs were used."""
    backends = torch.backends
    if device.type == "cuda":
        flags = (backends.cudnn.conv, backends.cudnn) if conv else (backends.cuda.matmul,)
    elif device.type == "cpu":
        flags = (backends.mkldnn.conv if conv else backends.mkldnn.matmul, backends.mkldnn)
    else:
        return "unknown"
    modes = [getattr(f, "fp32_precision", "none") for f in (*flags, backends)]
    return next((mode for mode in modes if mode != "none"), "ieee")


def tolerance(m: nn.Module, dtype: torch.dtype, device: torch.device) -> float:
    """The relative L2 difference between `m`'s output and its float64 affine map that is still rounding.
    Measured with up to 16k inputs per output: float64 ~1e-15, IEEE float32 ~3e-7 (CPU), TF32 ~5e-4, bf16 products
    and 16-bit outputs ~1e-3..1e-2. Each bound leaves a wide margin over that, and as little as it can for a hook
    or override that changes the output a little (1e-4 relative is caught in float32 on the CPU)."""
    if torch.finfo(dtype).bits < 32:
        return 3e-2
    if dtype == torch.float64:  # never TF32 or bf16
        return 1e-9
    mode = "ieee" if is_batchnorm(m) else _fp32_precision(device, conv=isinstance(m, CONVS))  # BN: no products
    return {"ieee": 1e-5, "tf32": 5e-3, "bf16": 3e-2}.get(mode, 5e-3)  # another device: as loose as TF32
