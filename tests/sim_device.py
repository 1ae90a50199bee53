"""A simulated second device on a CPU-only machine, for testing `--device` code without a GPU.

Tensors "on the device" are CPU tensors wrapped in `Sim`, whose `.device` says "meta:1" (the device the code
under test is given; the plain "meta" device, on which the job builds its empty model, is left alone). Inside `SimDevice()`:

- `t.to(SIM)` and factories with `device=SIM` (torch.zeros, torch.eye, ...) make Sim tensors;
- `t.to("cpu")` / `.cpu()` of a Sim tensor gives the plain CPU tensor back;
- an op on Sim tensors runs the CPU kernel on their data (so the results are the CPU's, bit for bit) and wraps what
  it returns; an op that meets a Sim tensor and a plain CPU tensor of one or more dimensions raises, as CUDA does
  ("Expected all tensors to be on the same device"); copies between the two (`copy_`) are allowed, as on CUDA;
- `.numpy()` of a Sim tensor fails, as a CUDA tensor's does.

So code that forgets to move a tensor, or allocates without `device=`, fails here as it would on a GPU, while code
that gets it right computes exactly what it computes on the CPU.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

SIM = torch.device("meta", 1)
_aten = torch.ops.aten
_CPU = torch.device("cpu")
# copies across devices are legal on CUDA; these must not count as a mix
_CROSS_DEVICE_OK = {_aten.copy_.default, _aten._to_copy.default}


class Ledger:
    """What the simulated device holds, as torch.cuda.memory_allocated counts a GPU's: the bytes of every storage a
    live Sim tensor is backed by (views share their storage's bytes), and the most held at once since `reset_peak`."""

    def __init__(self):
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, Sim tensors backed by it]
        self.now = self.peak = 0

    def add(self, sim: "Sim") -> None:
        storage = sim.cpu_data.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if not nbytes:
            return
        entry = self.live.get(key)
        if entry is None:
            self.live[key] = [nbytes, 1]
            self.now += nbytes
            self.peak = max(self.peak, self.now)
        else:
            entry[1] += 1
        weakref.finalize(sim, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if not entry[1]:
            self.now -= entry[0]
            del self.live[key]

    def reset_peak(self) -> int:
        """The peak since the last reset; the next one starts from what is held now."""
        peak, self.peak = self.peak, self.now
        return peak


LEDGER = Ledger()


class Sim(torch.Tensor):
    @staticmethod
    def __new__(cls, data: torch.Tensor):
        r = torch.Tensor._make_wrapper_subclass(cls, data.shape, strides=data.stride(), storage_offset=data.storage_offset(),
                                                dtype=data.dtype, device=SIM, requires_grad=data.requires_grad)
        r.cpu_data = data
        LEDGER.add(r)
        return r

    def __repr__(self):
        return f"Sim({self.cpu_data!r})"

    def data_ptr(self) -> int:  # as on CUDA: the address of the data (GramCollector tells shared inputs by it)
        return self.cpu_data.data_ptr()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # only reached outside SimDevice
        raise RuntimeError(f"a simulated-device tensor used outside SimDevice ({func})")


def _on_sim(device) -> bool:
    return device is not None and torch.device(device) == SIM


def _wrap(t):
    return Sim(t) if type(t) is torch.Tensor else t


def _unwrap(t):
    return t.cpu_data if isinstance(t, Sim) else t


def _check_not_mixed(func, leaves) -> None:
    mixed = [tuple(t.shape) for t in leaves if type(t) is torch.Tensor and t.dim() > 0]
    if mixed and any(isinstance(t, Sim) for t in leaves) and func not in _CROSS_DEVICE_OK:
        raise RuntimeError(f"Expected all tensors to be on the same device ({func}: CPU tensors of shapes {mixed} "
                           "met tensors on the simulated device)")


class _SameKernels(TorchFunctionMode):
    """Functions that pick their kernel by the device: run with the CPU's choice (attention's flash kernel for the
    CPU, not the fallback a "meta" device gets), so the simulated device computes the CPU's bits, backward too."""

    BY_DEVICE = {F.scaled_dot_product_attention}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.BY_DEVICE:
            leaves = tree_leaves((args, kwargs))
            if any(isinstance(t, Sim) for t in leaves):
                _check_not_mixed(func, leaves)
                flat, spec = torch.utils._pytree.tree_flatten((args, kwargs))
                where = [i for i, t in enumerate(flat) if isinstance(t, Sim)]
                return _OnCpu.apply(func, flat, spec, where, *[flat[i] for i in where])
        return func(*args, **kwargs)


class _OnCpu(torch.autograd.Function):
    """func on the Sim tensors' CPU data, with the CPU's own backward (its graph kept on the CPU data)."""

    @staticmethod
    def forward(ctx, func, flat, spec, where, *sims):
        plain = [t.cpu_data.detach().requires_grad_(t.requires_grad) for t in sims]
        flat = list(flat)
        for i, p in zip(where, plain):
            flat[i] = p
        args, kwargs = torch.utils._pytree.tree_unflatten(flat, spec)
        with torch.enable_grad():
            out = func(*args, **kwargs)
        ctx.plain, ctx.out = plain, out
        return Sim(out.detach())

    @staticmethod
    def backward(ctx, grad):
        needs = [p for p in ctx.plain if p.requires_grad]
        got = iter(torch.autograd.grad(ctx.out, needs, _unwrap(grad), allow_unused=True) if needs else [])
        grads = [(_wrap(next(got)) if p.requires_grad else None) for p in ctx.plain]
        return (None, None, None, None, *grads)


@contextlib.contextmanager
def SimDevice():
    """The simulated device's rules (the module's docstring), for the code run inside."""
    with _SameKernels(), _SimDispatch():
        yield


class _SimDispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _on_sim(kwargs.get("device")):  # a factory there, or a copy to it
            kwargs["device"] = _CPU
            return tree_map(_wrap, func(*tree_map(_unwrap, args), **kwargs))
        if func is _aten._to_copy.default and isinstance(args[0], Sim):
            out = func(_unwrap(args[0]), **kwargs)
            return out if kwargs.get("device") is not None else Sim(out)  # to the CPU, or another dtype there
        leaves = tree_leaves((args, kwargs))
        if not any(isinstance(t, Sim) for t in leaves):
            return func(*args, **kwargs)
        _check_not_mixed(func, leaves)
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if "out" in kwargs:
            return kwargs["out"]
        if func._schema.name.endswith("_"):  # in place: the Sim tensor itself, its data changed
            return args[0]
        return tree_map(_wrap, out)
