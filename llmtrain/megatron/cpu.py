"""Megatron-Core on the CPU: the few places where it insists on CUDA, redirected to the CPU.

CPU runs are a product feature (laptops, CI). Megatron-Core 0.19.2 runs its models, DDP,
optimizers and pipeline schedules on CPU tensors over gloo once these are answered:

- it creates some tensors with an explicit `device="cuda"` (optimizer scales, token counters,
  gradient norms): a TorchFunctionMode turns that device into the CPU;
- it calls `Tensor.cuda()`, `torch.cuda.current_device()`, `torch.cuda.synchronize()`
  (pipeline p2p) and `torch.cuda.current_stream()` (DDP waits on it before reducing gradients):
  identity, "cpu", a no-op and a stream whose waits are no-ops (CPU work is already ordered);
- its RNG tracker saves and restores the CUDA generator: the CPU generator stands in;
- it checks parameters by their CUDA type names (`param.type() == 'torch.cuda.FloatTensor'` in
  gradient clipping and in the mixed-precision and distributed optimizers): CPU tensors answer
  with the CUDA name, so the same code paths run;
- its MoE router's gating GEMM goes through Transformer Engine wherever TE is installed, which
  takes CUDA tensors: on the CPU it takes its own torch.mm path (a CPU run on a GPU machine);
- it torch.compile's a few small functions (the router's expert-bias bookkeeping of aux-loss-free
  balancing), which on the CPU costs a C++ build of some 20 s at the first step, more than a
  tiny model's whole run, and on a GPU machine fails (the compiler asks the GPU's properties of
  `current_device()`, which is "cpu" here): they run eagerly (TorchDynamo off), as their plain
  Python reads.

`enable()` is called once per process, before any model is built, and only when the run's device
is the CPU. Nothing here changes numerics.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_enabled = False


class _CudaDeviceToCpu(TorchFunctionMode):
    """Tensor creation that names a CUDA device lands on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and str(device).startswith("cuda"):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


class _OrderedStream:
    """The CPU runs operations in program order: there is nothing to wait for."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


_tensor_type = torch.Tensor.type


def _type_with_cuda_names(self, dtype=None, non_blocking=False, **kwargs):
    if dtype is None and not kwargs and self.device.type == "cpu":
        return "torch.cuda." + _tensor_type(self).rsplit(".", 1)[-1]
    return _tensor_type(self, dtype, non_blocking, **kwargs)


def enable() -> None:
    global _enabled
    if _enabled:
        return
    _enabled = True
    _CudaDeviceToCpu().__enter__()
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.type = _type_with_cuda_names
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_stream = lambda *args, **kwargs: _OrderedStream()
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)
    torch._dynamo.config.disable = True

    import megatron.core.tensor_parallel.random as mcore_random
    import megatron.core.transformer.moe.moe_utils as moe_utils

    moe_utils.te_general_gemm = None

    mcore_random._get_cuda_rng_state = (
        lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state())
    mcore_random._set_cuda_rng_state = (
        lambda state, device=-1, graph_safe=False: torch.set_rng_state(state))
