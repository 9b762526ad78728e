"""FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, gradients and optimizer state sharded.

The engine calls `fully_shard` itself, per block (the module classes `block_classes` names) and per
model, over a one-dimensional mesh of all processes: Accelerate only runs the process group (it does
not switch to FSDP on CPU, and its own FSDP path would take over backward and accumulation).
`fully_shard` replaces every parameter with a sharded DTensor, so each recipe optimizer is rebuilt
over the new parameters with its parameter groups' settings and its schedule.

Accumulation stays the core's: gradients are reduce-scattered once, on the window's last backward
(`set_requires_gradient_sync`), or after every micro-batch with `fsdp.sync_every_micro_batch`
(sharded gradients in between; the sum of reduced micro-batch gradients is the reduced sum, so the
update is the same). FSDP averages over processes as DDP does, which the core's
`world_size / global count` scale cancels.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Shard

from disttrain.accumulation import OptimizerGroup, UpdateResult, WindowResult
from disttrain.config import Config, ConfigError
from disttrain.engines.base import Engine, build_accelerator
from disttrain.engines.process_group import gather_over
from disttrain.optim import same_class_optimizer
from disttrain.safe_files import CheckpointError, dcp_planner, dcp_reader, file_sha256

STATE_DIR = "fsdp"  # in a checkpoint: torch.distributed.checkpoint's files, one per process plus its metadata


class FSDPEngine(Engine):
    name = "fsdp"

    def __init__(self, cfg: Config):
        # Accelerate stays a plain process group in full precision: FSDP's policy casts, and an
        # Accelerate FSDP plugin (GPUs) would wrap models on prepare, which this engine never calls.
        os.environ.pop("ACCELERATE_USE_FSDP", None)
        super().__init__(cfg, build_accelerator(cfg, "no", find_unused_parameters=False))
        self.model_of: dict[str, str] = {}  # optimizer group -> the model its parameters belong to
        # Each model's modules as they were before sharding, with meta tensors (no memory): the
        # forward that input_gradient_forward runs on gathered weights, outside FSDP's hooks.
        self.structures: dict[str, nn.Module | Exception] = {}

    # ------------------------------------------------------------------ wrapping

    def wrap(self, models: dict[str, nn.Module], groups: list[OptimizerGroup]) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if not dist.is_initialized():
            # One plain process: fully_shard needs a process group all the same (of one).
            backend = "cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        blocks, root = self._shard_options(root=False), self._shard_options(root=True)
        # Parameters by name before sharding: fully_shard registers new (DTensor) ones under the same names.
        before = {name: dict(model.named_parameters()) for name, model in models.items()}
        for name, model in models.items():
            self.structures[name] = _meta_copy(model)
            model.to(self.device)
            # Innermost first: a block inside a block must be its own unit before the outer one is.
            for module in reversed(list(model.modules())):
                if module is not model and isinstance(module, self.block_classes):
                    fully_shard(module, mesh=mesh, **blocks)
            fully_shard(model, mesh=mesh, **root)
            self.models[name] = model
        replaced = {
            id(old): dict(models[name].named_parameters())[fqn]
            for name, params in before.items()
            for fqn, old in params.items()
        }
        owner = {id(old): name for name, params in before.items() for old in params.values()}
        for group in groups:
            owners = {owner.get(id(p)) for p in group.params}
            if len(owners) != 1 or None in owners:
                raise ConfigError(
                    f"optimizer '{group.name}' holds parameters of {sorted(map(str, owners))}: under FSDP each "
                    "optimizer must train parameters of exactly one of the recipe's models"
                )
            self.model_of[group.name] = owners.pop()
            group.optimizer = _rebuilt_optimizer(group, replaced)
            group.scheduler = _rebuilt_scheduler(group.scheduler, group.optimizer)
        self.groups = groups

    def _shard_options(self, root: bool) -> dict[str, Any]:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

        f = self.cfg.fsdp
        precision = MixedPrecisionPolicy()
        if self.cfg.mixed_precision == "bf16":
            # bf16 compute and float32 gradient reduction. Only the model's own output is cast to float32
            # (losses are summed in float32): a block's output stays bf16, because the root's layers after
            # the blocks (a final norm) compute with bf16 weights and would refuse a float32 input.
            precision = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.float32 if root else None
            )
        offload = OffloadPolicy()
        if f.cpu_offload:
            # Pinned host memory speeds the copies to and from an accelerator; without one there is no
            # copy to speed, and pinning itself fails ("Cannot access accelerator device").
            offload = CPUOffloadPolicy(pin_memory=self.device.type != "cpu")
        return {"reshard_after_forward": f.reshard_after_forward, "mp_policy": precision, "offload_policy": offload}

    # ------------------------------------------------------------------ micro-steps

    def sync_context(self, models: Sequence[nn.Module], sync: bool) -> contextlib.AbstractContextManager:
        # Read by FSDP in the post-backward of each unit; recursive, so blocks follow their model.
        for model in models:
            model.set_requires_gradient_sync(sync or self.cfg.fsdp.sync_every_micro_batch)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, models: Sequence[nn.Module]) -> None:
        loss.backward()

    # ------------------------------------------------------------------ the boundary

    def update(
        self, names: Sequence[str], groups: Sequence[OptimizerGroup], window: WindowResult | None
    ) -> UpdateResult:
        norms = self._grad_norms(groups)
        # The norms are reduced over all processes, NaN/inf included: the same decision everywhere.
        nonfinite = not all(bool(torch.isfinite(n)) for n in norms.values())
        if not nonfinite:
            for g in groups:
                if g.clip_grad_norm > 0:
                    coefficient = (g.clip_grad_norm / (norms[g.name] + 1e-6)).clamp(max=1.0)
                    for grad in _local_grads(g):
                        grad.mul_(coefficient.to(grad.dtype))
                g.optimizer.step()
            for g in groups:
                g.scheduler.step()
        for name in names:
            self.models[name].zero_grad(set_to_none=True)
        return UpdateResult(grad_norms=norms, skipped=False, nonfinite=nonfinite)

    def _grad_norms(self, groups: Sequence[OptimizerGroup]) -> dict[str, torch.Tensor]:
        """Each group's gradient norm over all shards, all groups in one all-reduce of squared sums."""
        squares = torch.stack(
            [
                torch.stack([torch.linalg.vector_norm(grad).double() ** 2 for grad in _local_grads(g)]).sum()
                if _local_grads(g)
                else torch.zeros((), dtype=torch.float64, device=self.device)
                for g in groups
            ]
        ).to(self.device)
        if self.world_size > 1:
            dist.all_reduce(squares)
        return dict(zip((g.name for g in groups), squares.sqrt().unbind(), strict=True))

    # ------------------------------------------------------------------ a second backward

    def input_gradient_forward(self, module: nn.Module) -> Callable[..., Any]:
        """A forward of `module` on its gathered weights, through the module's structure without FSDP's
        hooks: those run FSDP's post-backward at the end of the input-gradient pass and free the
        gathered weights that the penalty's own backward still needs. Gathers when called (a
        collective: every process calls it for the same micro-batches).

        The backward of the gather reduce-scatters into the sharded gradients (divided by the process
        count, as FSDP's own reduction is), whatever the window's sync: exact, one reduction more per
        such micro-batch. Precision follows FSDP's policy: gathered in the weights' dtype, computed in
        bf16 under mixed_precision=bf16, the output in float32."""
        name = next((n for n, m in self.models.items() if m is module), None)
        if name is None:
            return module  # not sharded by this engine
        structure = self.structures[name]
        if isinstance(structure, Exception):
            raise RuntimeError(
                f"model '{name}' could not be copied before sharding ({structure}); its input-gradient "
                "forward (R1) needs that copy under FSDP: use DDP or ZeRO 1 or 2 for it"
            ) from structure
        compute = torch.bfloat16 if self.cfg.mixed_precision == "bf16" else None
        world = self.world_size
        tensors: dict[str, torch.Tensor] = {}
        for fqn, param in module.named_parameters():
            whole = param.to(self.device).full_tensor(grad_placements=[Partial()])  # backward: reduce-scatter, sum
            if whole.requires_grad:
                whole.register_hook(lambda grad: grad / world)
            tensors[fqn] = whole.to(compute) if compute else whole
        tensors.update(module.named_buffers())

        def forward(*args: Any) -> Any:
            if compute:
                args = tuple(a.to(compute) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
            out = torch.func.functional_call(structure, tensors, args)
            return out.float() if compute else out

        return forward

    # ------------------------------------------------------------------ full weights and evaluation

    def full_weights(self, module: nn.Module) -> contextlib.AbstractContextManager:
        return self._full_weights(module)

    @contextlib.contextmanager
    def _full_weights(self, module: nn.Module) -> Iterator[None]:
        """Inside the block the module's parameters are whole (gathered, in the compute precision) for
        forwards and reads, and its `state_dict()` on the main process holds the full float32
        tensors (gathered from the shards); a collective."""
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(module, FSDPModule):
            yield
            return
        full = self._gathered_state(module)

        def whole(_: nn.Module, state: dict[str, Any], prefix: str, __: Any) -> None:
            for key, value in full.items():
                if prefix + key in state:
                    state[prefix + key] = value

        handle = module.register_state_dict_post_hook(whole)
        units = [m for m in module.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.unshard()
        try:
            yield
        finally:
            handle.remove()
            for unit in reversed(units):
                unit.reshard()

    def _gathered_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Full tensors of `module`'s state on the main process (empty elsewhere); a tensor shared by
        several names stays one tensor, so that weight files keep the tie."""
        full: dict[str, torch.Tensor] = {}
        seen: dict[int, torch.Tensor] = {}
        # keep_vars: the parameters themselves, one object for a shared one (state_dict() would detach
        # each name into its own DTensor, and each would gather into its own full tensor).
        for key, value in module.state_dict(keep_vars=True).items():
            if id(value) not in seen:
                whole = value.full_tensor() if isinstance(value, DTensor) else value
                seen[id(value)] = whole.detach().cpu() if self.is_main_process else whole.new_empty(0)
            full[key] = seen[id(value)]
        return full if self.is_main_process else {}

    def full_weights_later(self, module: nn.Module, group: Any) -> Callable[[], dict[str, torch.Tensor]] | None:
        """A copy of this process's shards now; the function returned gathers them to the main process
        over `group` (a collective: every process calls it) and returns the full tensors there (empty
        elsewhere), shared names kept one tensor. None where the shards are not row blocks of one
        mesh dimension (HSDP): those are gathered in the step."""
        shards: dict[str, torch.Tensor] = {}
        sharded: set[str] = set()
        aliases: dict[str, str] = {}
        first: dict[int, str] = {}
        for key, value in module.state_dict(keep_vars=True).items():  # keep_vars: one object per tie
            if id(value) in first:
                aliases[key] = first[id(value)]
                continue
            first[id(value)] = key
            if isinstance(value, DTensor):
                if tuple(value.placements) != (Shard(0),):
                    return None
                sharded.add(key)
                value = value.to_local()
            shards[key] = value.detach().clone()

        def gather() -> dict[str, torch.Tensor]:
            every = gather_over(group, to_main=True)(shards)
            if not self.is_main_process:
                return {}
            # A Shard(0) DTensor splits its rows as torch.chunk does: in rank order they are the whole.
            full = {k: torch.cat([part[k] for part in every]) if k in sharded else v for k, v in shards.items()}
            full.update({alias: full[kept] for alias, kept in aliases.items()})
            return full

        return gather

    def evaluation_share(self, models: dict[str, nn.Module]) -> tuple[int, int]:
        # A sharded module gathers its parameters in every forward, a collective: every process must run
        # the same forwards, so each scores all of the held-out data.
        return 0, 1

    # ------------------------------------------------------------------ checkpoints

    def save_state(self, directory: str) -> dict[str, str]:
        """Every process writes its shards in parallel (torch.distributed.checkpoint); each checksums
        its own files, the main process gets all the digests."""
        import torch.distributed.checkpoint as dcp

        path = os.path.join(directory, STATE_DIR)
        dcp.save(self._state(), checkpoint_id=path)
        return self._digests(path, self.gather_objects)

    def save_state_later(self, directory: str, group: Any) -> Callable[[], dict[str, str]]:
        """DCP's asynchronous save: it copies the shards to host memory before it returns, then its
        thread writes them, coordinating over `group` (not the training group, busy meanwhile)."""
        import torch.distributed.checkpoint as dcp

        path = os.path.join(directory, STATE_DIR)
        written = dcp.async_save(self._state(), checkpoint_id=path, process_group=group)

        def write() -> dict[str, str]:
            written.result()
            return self._digests(path, gather_over(group))

        return write

    def _digests(self, path: str, gather: Callable[[Any], list[Any]]) -> dict[str, str]:
        own = sorted(glob.glob(os.path.join(path, f"__{self.rank}_*")))
        if self.is_main_process:
            own += [p for p in glob.glob(os.path.join(path, ".*")) if os.path.isfile(p)]
        digests: dict[str, str] = {}
        for part in gather({p: file_sha256(p) for p in own}):
            digests.update(part)
        return digests if self.is_main_process else {}

    def load_state(self, directory: str) -> None:
        """Load the shards this process holds now, whatever process count wrote them. Tensors and values
        are read with `torch.load(weights_only=True)` (DCP's default planner would unpickle values
        without limits); the metadata file, a pickle, is checked against the manifest's sha256 before
        anything is read, and may name only DCP's own records."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        path = os.path.join(directory, STATE_DIR)
        state = self._state()
        try:
            dcp.load(state, storage_reader=dcp_reader(path), planner=dcp_planner())
        except Exception as e:
            raise CheckpointError(f"checkpoint {directory}: the FSDP shards could not be loaded ({e})") from e
        for name, model in self.models.items():
            set_model_state_dict(model, state["models"][name])
        for g in self.groups:
            set_optimizer_state_dict(self.models[self.model_of[g.name]], g.optimizer, state["optimizers"][g.name])

    def _state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        return {
            "models": {name: get_model_state_dict(model) for name, model in self.models.items()},
            "optimizers": {
                g.name: get_optimizer_state_dict(self.models[self.model_of[g.name]], g.optimizer) for g in self.groups
            },
        }

    def restores_weights(self, name: str) -> bool:
        return name in self.models  # from its shards; exported modules outside the engine (an EMA) do not

    def check_resumable(self, saved_world_size: int, path: str) -> None:
        return None  # DCP re-shards to any process count


def _meta_copy(module: nn.Module) -> nn.Module | Exception:
    """`module`'s structure with its parameters and buffers on the meta device: modules, no data."""
    memo: dict[int, Any] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    try:
        return copy.deepcopy(module, memo)
    except Exception as e:  # only input_gradient_forward needs the copy: it reports this
        return e


def _local_grads(group: OptimizerGroup) -> list[torch.Tensor]:
    """This process's shards of the group's gradients."""
    return [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in group.params if p.grad is not None]


def _rebuilt_optimizer(group: OptimizerGroup, replaced: dict[int, nn.Parameter]) -> torch.optim.Optimizer:
    """The group's optimizer over the sharded parameters: same class, each parameter group's settings
    kept, constructor defaults from the ones it was built with."""
    old = group.optimizer
    if old.state:
        raise RuntimeError(f"optimizer '{group.name}' has state before FSDP wraps it; wrap before training")
    param_groups = [{**pg, "params": [replaced[id(p)] for p in pg["params"]]} for pg in old.param_groups]
    try:
        return same_class_optimizer(old, param_groups)
    except TypeError as e:
        raise ConfigError(
            f"FSDP rebuilds each optimizer over the sharded parameters, and {type(old).__name__} for "
            f"'{group.name}' cannot be rebuilt from its defaults ({e}); give the class defaults that match its "
            "constructor, or use DDP"
        ) from e


def _rebuilt_scheduler(
    old: torch.optim.lr_scheduler.LRScheduler, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule over the rebuilt optimizer, at the same point (nothing has stepped yet)."""
    if isinstance(old, torch.optim.lr_scheduler.LambdaLR):
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, old.lr_lambdas)
        scheduler.load_state_dict(old.state_dict())
        return scheduler
    raise ConfigError(
        f"FSDP rebuilds each optimizer's schedule, and {type(old).__name__} is not a LambdaLR; "
        "build schedules with disttrain.optim.build_group, or use DDP"
    )
