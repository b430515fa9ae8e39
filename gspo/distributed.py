"""Data parallelism over torch.distributed: every helper is a no-op in a single process.

Launch with torchrun; `init_from_env` picks NCCL on CUDA and gloo on CPU. Replicated (train.sharding: replicated),
every rank holds the whole model and optimizer, and gradients are summed explicitly (in buckets) after each
accumulated minibatch rather than by a DDP wrapper, because ranks may hold different numbers of rows of a
minibatch (even none) and the loss is already weighted to the global minibatch.

Sharded (train.sharding: fsdp), every decoder layer and the rest of the model are FSDP2 units (`shard`): each rank
keeps 1/world of the weights, gradients and optimizer states, a forward gathers one unit's weights at a time, and
the backward sums gradients into their shards. Every forward then needs all ranks, so they run the same number
of them (gspo.update's idle passes, lockstep decoding). The optimizer steps each rank's shards as plain tensors
(`optimizer_params`), and checkpoints gather everything to rank 0 in the replicated run's format, so a run
resumes across the switch either way.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from gspo.models import pick_device

_BUCKET_ELEMS = 64 * 1024 * 1024  # elements per all-reduce: bounds the flat copy's memory


def init_from_env() -> bool:
    """Join the process group torchrun describes in the environment; False when not launched that way."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _active() -> bool:
    return rank_and_world()[1] > 1


def device(name: str) -> torch.device:
    if _active() and torch.cuda.is_available() and name in ("auto", "cuda"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return pick_device(name)


def barrier() -> None:
    if _active():
        dist.barrier()


def any_flag(flag: bool, dev: torch.device) -> bool:
    """True if any rank's flag is (a stop request seen by one rank stops all of them at the same point)."""
    if not _active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj):
    """Rank 0's obj on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (an FSDP parameter, its gradient); any other tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def all_min(t: torch.Tensor) -> torch.Tensor:
    """A float tensor's minimum over ranks, on the device: a vote that no host waits for."""
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def max_ints(xs: list[int], dev: torch.device) -> list[int]:
    """Each position's largest value over ranks."""
    if not _active():
        return list(xs)
    t = torch.tensor(xs, dtype=torch.int64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all the tensors together, on the device (no host read); of sharded tensors, over every
    rank's shard."""
    norm = torch.nn.utils.get_total_norm([local(t) for t in tensors])
    if _active() and any(isinstance(t, DTensor) for t in tensors):
        sq = norm.double().square()
        dist.all_reduce(sq)
        norm = sq.sqrt().to(norm.dtype)
    return norm


def grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Every parameter's gradient; each must have one (the update gives parameters without rows zeros)."""
    out = [p.grad for p in params]
    if any(g is None for g in out):
        raise RuntimeError("a parameter has no gradient at the update")
    return [g for g in out if g is not None]


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float, norm: torch.Tensor) -> None:
    """Scale the gradients so their total norm (`norm`, computed before) is at most max_norm; torch's
    clip_grads_with_norm_, on each rank's shard of sharded gradients."""
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_([local(g) for g in grads(params)], coef)


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce every parameter's gradient in buckets; each must have one (a rank with no rows passes zeros).
    Sharded parameters' gradients were already summed into their shards by FSDP during the backward."""
    if not _active() or any(isinstance(p, DTensor) for p in params):
        return
    bucket: list[torch.Tensor] = []
    size = 0
    for g in [*grads(params), None]:
        if g is not None:
            bucket.append(g)
            size += g.numel()
        if bucket and (g is None or size >= _BUCKET_ELEMS):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            offset = 0
            for b in bucket:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = [], 0


def reduce_stats(stats: dict[str, torch.Tensor] | None, dev: torch.device) -> dict[str, torch.Tensor] | None:
    """Loss statistics (gspo.metrics) of every rank combined: sums summed, ratio_min / ratio_max as min / max.
    Every rank must call it; a rank whose rows were all skipped passes what it has (possibly no ratio keys)."""
    if not _active():
        return stats
    from gspo.metrics import SUMS

    stats = stats or {}
    sums = torch.stack(
        [stats[k].double() if k in stats else torch.zeros((), dtype=torch.float64, device=dev) for k in SUMS]
    ).to(dev)
    has = torch.tensor([float(k in stats) for k in SUMS], dtype=torch.float64, device=dev)
    ext = torch.stack(
        [
            stats.get("ratio_min", torch.tensor(float("inf"))).double().to(dev),
            -stats.get("ratio_max", torch.tensor(float("-inf"))).double().to(dev),
        ]
    )
    dist.all_reduce(sums)
    dist.all_reduce(has)
    dist.all_reduce(ext, op=dist.ReduceOp.MIN)
    out = {k: sums[i] for i, k in enumerate(SUMS) if has[i] > 0}
    if torch.isfinite(ext[0]):
        out |= {"ratio_min": ext[0], "ratio_max": -ext[1]}
    return out


def gather(x: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """Concatenate an equally sized 1-D tensor from every rank, in rank order (on the CPU)."""
    if not _active():
        return x
    x = x.to(dev)
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return torch.cat(out).cpu()


def gather_lists(d: dict[str, list]) -> dict[str, list]:
    if not _active():
        return d
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, d)
    merged: dict[str, list] = {}
    for p in parts:
        for k, v in p.items():
            merged.setdefault(k, []).extend(v)
    return merged


def sum_floats(xs: list[float], dev: torch.device) -> list[float]:
    if not _active():
        return [float(x) for x in xs]
    t = torch.tensor(xs, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.tolist()


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(next(model.parameters()), DTensor)


def shard(model: torch.nn.Module, dev: torch.device) -> None:
    """FSDP2 over all ranks: each decoder layer (the model's `_no_split_modules`) one unit, the rest (embeddings,
    final norm, LM head) the root's. Gradients are summed over ranks, not averaged: the loss is already weighted
    to the global minibatch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    if not layers:
        raise ValueError(
            f"train.sharding=fsdp: {type(model).__name__} names no decoder layer class "
            "(_no_split_modules) to shard by; use train.sharding=replicated"
        )
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain sum: gloo has no pre-multiplied one


def optimizer_params(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """What the optimizer steps: the parameters, or for sharded ones each rank's shard as a plain tensor sharing
    its storage (bitsandbytes' kernels and the bf16 rounding step take no DTensor). `attach` points them at the
    shards and their gradients before each step."""
    if not any(isinstance(p, DTensor) for p in params):
        return params
    return [torch.nn.Parameter(local(p).detach(), requires_grad=p.requires_grad) for p in params]


def attach(params: list[torch.nn.Parameter], views: list[torch.nn.Parameter]) -> None:
    """The shards' current storage and gradients into their plain views (FSDP may re-allocate a shard)."""
    for v, p in zip(views, params):
        v.data = local(p).detach()
        v.grad = None if p.grad is None else local(p.grad)


def _tensors(tree, path=()):
    """(path, tensor) for every tensor in nested dicts, in a fixed order (sorted keys): collectives over them
    line up across ranks."""
    if torch.is_tensor(tree):
        yield path, tree
    elif isinstance(tree, dict):
        for k in sorted(tree, key=str):
            yield from _tensors(tree[k], path + (k,))


def _dicts_copied(tree: Any) -> Any:
    return {k: _dicts_copied(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _put(tree: dict, path: tuple, value: torch.Tensor | None) -> None:
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def full_optimizer_state(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> dict | None:
    """opt.state_dict() as one process holding the whole model would have it: every state tensor the shape of
    its parameter's shard is gathered whole. A collective under fsdp (every rank calls it); the result on rank 0,
    None on the others. Replicated, it is opt.state_dict()."""
    sd = opt.state_dict()
    if not any(isinstance(p, DTensor) for p in params):
        return sd
    rank = dist.get_rank()
    sd["state"] = {i: _dicts_copied(st) for i, st in sd["state"].items()}  # state_dict shares the live ones
    for i in sorted(sd["state"]):
        p = params[i]
        for path, t in list(_tensors(sd["state"][i])):
            if t.dim() and t.shape == local(p).shape:
                whole = DTensor.from_local(
                    t, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
                ).full_tensor()
                _put(sd["state"][i], path, whole.cpu() if rank == 0 else None)
    return sd if rank == 0 else None


def local_optimizer_state(sd: dict, params: list[torch.nn.Parameter]) -> dict:
    """The inverse of `full_optimizer_state` on every rank: each state tensor the shape of its whole parameter
    cut to this rank's shard (no communication: every rank reads the checkpoint)."""
    from torch.distributed.tensor import distribute_tensor

    if not any(isinstance(p, DTensor) for p in params):
        return sd
    for i in sd["state"]:
        p = params[i]
        for path, t in list(_tensors(sd["state"][i])):
            if t.dim() and t.shape == p.shape:
                shard_ = distribute_tensor(t.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                _put(sd["state"][i], path, shard_.to_local().clone())
    return sd


def full_model_state(model: torch.nn.Module) -> dict | None:
    """The whole model's state dict on rank 0's CPU (a collective: every rank calls it; None on the others)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    # A tied weight (embeddings and LM head) once, under its first name, as save_pretrained writes it.
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), name) != name:
            sd.pop(name, None)
    return sd


def load_full_model_state(model: torch.nn.Module, state: dict) -> tuple[list[str], list[str]]:
    """A whole state dict (every rank holds it) into the sharded model; (missing, unexpected) keys."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    return set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
