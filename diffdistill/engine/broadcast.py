"""One reader for the frozen teacher: the main process's weights, broadcast to every other process.

With ``load_on_main_only`` (see :func:`diffdistill.run.load_recipe_teacher`) only the main process
reads the teacher's weight files; the others build the same networks on the meta device
(:mod:`diffdistill.backbones.meta`). Here every process puts them on its device -- the others
allocate them uninitialized (``to_empty``) -- and the main process's tensors are broadcast to all,
one at a time, in each module's own order. Buffers go too, non-persistent ones included (position
ids, rotary tables), so every process ends with the main process's bits, not only its state dict.

This runs before the student and critic are copied from the teacher and before anything is
sharded, so plain ``torch.distributed.broadcast`` of whole tensors is all it takes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


@torch.no_grad()
def broadcast_from_main(modules: dict[str, nn.Module], device) -> None:
    """Every process calls it (a collective) with the same modules, built from the same configs:
    loaded on the main process, on meta on the others. Afterwards all hold the main one's on ``device``."""
    main = dist.get_rank() == 0
    layouts = [{name: tensor_layout(module) for name, module in modules.items()} if main else None]
    dist.broadcast_object_list(layouts, src=0, device=torch.device(device))  # dtypes and shapes, so the others can allocate
    for name in sorted(modules):
        module = modules[name]
        if main:
            module.to(device)
        else:
            materialize(name, module, layouts[0][name], device)
        for _, tensor in _named_tensors(module):
            dist.broadcast(tensor, src=0)


def _named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters then buffers, each tied tensor once: the same order on every process."""
    return [*module.named_parameters(), *module.named_buffers()]


def tensor_layout(module: nn.Module) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    return [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in _named_tensors(module)]


def materialize(name: str, module: nn.Module, layout: list, device) -> None:
    """``module`` (on meta) allocated on ``device`` as the main process holds it: the same tensors,
    in its dtypes (a loader may keep some in float32), with the same tied parameters."""
    ours = [(key, shape) for key, _, shape in tensor_layout(module)]
    if ours != [(key, shape) for key, _, shape in layout]:
        differ = next(((a, b) for a, b in zip(ours, layout) if a[0] != b[0] or a[1] != b[2]), (len(ours), len(layout)))
        raise RuntimeError(f"{name}: built from its config it differs from the main process's loaded one (first difference: "
                           f"{differ}); set load_on_main_only=false to have every process read the teacher")
    ties = _ties(module)
    for (_, tensor), (_, dtype, _) in zip(_named_tensors(module), layout):
        if tensor.dtype != dtype:
            tensor.data = tensor.data.to(dtype)  # on meta: no memory, no copy
    module.to_empty(device=device)  # gives each parameter a new tensor, untying tied ones
    for tied, source in ties:
        owner, _, leaf = tied.rpartition(".")
        setattr(module.get_submodule(owner), leaf, module.get_parameter(source))


def _ties(module: nn.Module) -> list[tuple[str, str]]:
    """(tied name, name of the parameter it shares) for every parameter reached under two names."""
    first, ties = {}, []
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in first:
            ties.append((name, first[id(param)]))
        else:
            first[id(param)] = name
    return ties


__all__ = ["broadcast_from_main", "materialize", "tensor_layout"]
