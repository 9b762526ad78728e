"""Functions that run on every rank of a `tests.dist.run_distributed` group."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable

import torch
from accelerate.utils import set_seed

from disttrain.config import Config, world_size_from_env
from disttrain.recipe import build_recipe
from disttrain.trainer import Trainer
from tests.cases import case_config
from tests.reference import named_grads, named_params, to_float64, unwrap


def make_trainer(
    recipe: str,
    window: str,
    accumulation: int,
    output_dir: str,
    steps: int = 3,
    *extra: str,
    float64: bool = True,
    past_checks: Callable[[Config], None] | None = None,
) -> Trainer:
    """`past_checks` changes the checked config: a setting preflight refuses on this machine."""
    cfg = case_config(recipe, window, world_size_from_env(), accumulation, output_dir, steps, *extra)
    if past_checks:
        past_checks(cfg)
    set_seed(cfg.seed)
    built = build_recipe(cfg)
    if float64:
        to_float64(built)
    return Trainer(cfg, built)


def run_cases(cases: list[tuple[str, str, int]], output_dir: str, steps: int = 3) -> dict:
    """Train each (recipe, window, accumulation) case; keep the gradients at every phase boundary,
    the items this process saw in each window, and the final exported weights (EMA included)."""
    out = {}
    for recipe, window, accumulation in cases:
        trainer = make_trainer(recipe, window, accumulation, output_dir, steps)
        grads, items = [], []
        for step in range(steps):
            for phase in trainer.recipe.phases(step):
                result = trainer.backward_window(phase)
                assert result.counts.shape == (len(phase.terms),)
                grads.append(named_grads(trainer.models))
                items.append(local_items(trainer, phase))
                trainer.optimizer_step(phase)
                leftover = list(named_grads(trainer.models))
                assert not leftover, f"gradients left after the {phase.name} step: {leftover[:3]}"
        params = named_params(trainer.recipe.exported_models())
        out[(recipe, window, accumulation)] = {"grads": grads, "params": params, "items": items}
    return out


def local_items(trainer: Trainer, phase) -> int:
    """Items of the phase's last loss term that this process saw (tokens for seq2seq)."""
    plans = trainer.sampler.window(phase.data_step, trainer.rank, trainer.world_size)
    return sum(int(phase.item_counts(phase.make_batch(p))[phase.terms[-1]]) for p in plans if not p.stand_in)


def run_naive(recipe: str, window: str, accumulation: int, output_dir: str) -> list[dict]:
    """The peers' accumulation: mean loss per micro-batch divided by the configured count.

    Same models, data and no_sync as the core, only the scaling differs; returns boundary gradients.
    """
    trainer = make_trainer(recipe, window, accumulation, output_dir, steps=2)
    r = trainer.recipe
    grads = []
    for step in range(2):
        plans = trainer.sampler.window(step, trainer.rank, trainer.world_size)
        for i, plan in enumerate(plans):
            batch = r.train_batch(plan.indices)
            counts = r.item_counts(batch)
            models = list(trainer.models.values())
            with trainer.engine.sync_context(models, sync=i == len(plans) - 1):
                loss = sum(loss_sum / counts[term] for term, loss_sum in r.losses(trainer.models, batch))
                trainer.engine.backward(loss / accumulation, models)
        grads.append(named_grads(trainer.models))
        trainer.optimizer_step(trainer.recipe.phases(step)[0])
    return grads


def watch_sync(recipe: str, accumulation: int, output_dir: str) -> dict:
    """Gradients after every micro-step and gradient all-reduce calls, for two windows."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    trainer = make_trainer(recipe, "full", accumulation, output_dir, steps=2)
    calls = [0]  # completed all-reduce rounds: a round ends with the bucket DDP marks as last

    def counting_hook(state, bucket):
        calls[0] += bucket.is_last()
        return allreduce_hook(state, bucket)

    for model in trainer.models.values():
        model.register_comm_hook(None, counting_hook)

    snapshots, calls_per_micro_step = [], []
    original = trainer.recipe.losses

    def spying_losses(models, batch):
        # Runs when the next micro-batch starts: the previous one's backward is complete.
        snapshots.append(named_grads(models))
        calls_per_micro_step.append(calls[0])
        yield from original(models, batch)

    trainer.recipe.losses = spying_losses
    for step in range(2):
        phase = trainer.recipe.phases(step)[0]
        trainer.backward_window(phase)
        snapshots.append(named_grads(trainer.models))
        calls_per_micro_step.append(calls[0])
        trainer.optimizer_step(phase)
    return {"snapshots": snapshots, "calls": calls_per_micro_step}


def watch_gan_phases(accumulation: int, output_dir: str) -> dict:
    """Per phase: each model's all-reduce rounds, gradients after each micro-step, and whether the
    model that the phase does not train kept its weights, optimizer state and empty gradients."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    trainer = make_trainer("gan_r1", "full", accumulation, output_dir, steps=2)
    rounds = {name: 0 for name in trainer.models}

    def counter(name):
        def hook(state, bucket):
            rounds[name] += bucket.is_last()
            return allreduce_hook(state, bucket)

        return hook

    for name, model in trainer.models.items():
        model.register_comm_hook(None, counter(name))

    log = []
    for step in range(2):
        for phase in trainer.recipe.phases(step):
            other = next(n for n in trainer.models if n not in phase.models)
            other_group = next(g for g in trainer.groups if g.name == other)
            before = named_params({other: trainer.models[other]})
            state_before = copy.deepcopy(other_group.optimizer.state_dict())
            rounds_before = dict(rounds)
            snapshots = []
            original = phase.losses

            def spying(models, batch, original=original, snapshots=snapshots, name=phase.models[0]):
                snapshots.append(named_grads({name: models[name]}))
                yield from original(models, batch)

            phase.losses = spying
            trainer.backward_window(phase)
            snapshots.append(named_grads({phase.models[0]: trainer.models[phase.models[0]]}))
            trainer.optimizer_step(phase)
            log.append(
                {
                    "phase": phase.name,
                    "terms": phase.terms,
                    "rounds": {n: rounds[n] - rounds_before[n] for n in rounds},
                    "snapshots": snapshots[1:],  # after each micro-step
                    "other_unchanged": all(
                        torch.equal(v, named_params({other: trainer.models[other]})[k]) for k, v in before.items()
                    ),
                    "other_state_unchanged": same_state(state_before, other_group.optimizer.state_dict()),
                    "other_grads": [n for n, p in trainer.models[other].named_parameters() if p.grad is not None],
                }
            )
    return {"log": log}


def same_state(a, b) -> bool:
    """Deep equality of optimizer state dicts (tensors compared exactly)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def run_engine_cases(cases: list[tuple[str, str, int, str]], output_dir: str, steps: int = 3, *extra: str) -> dict:
    """Train each (recipe, window, accumulation, engine) case in float32, where engine is "ddp" or a
    DeepSpeed JSON; keep the final weights (ZeRO keeps gradients in its own partitions)."""
    out = {}
    for recipe, window, accumulation, engine in cases:
        args = [*DEEPSPEED_CASE[recipe], *([] if engine == "ddp" else [f"deepspeed_config={engine}"]), *extra]
        trainer = make_trainer(recipe, window, accumulation, output_dir, steps, *args, float64=False)
        for step in range(steps):
            trainer.train_step(step)
        exported = trainer.recipe.exported_models()
        params = {}
        for name, model in exported.items():
            with trainer.engine.full_weights(model):
                params.update(named_params({name: model}))
        out[(recipe, window, accumulation, engine)] = params
    return out


# DeepSpeed runs one optimizer (and one clip threshold) per model: the seq2seq case uses one class
# and one threshold for encoder and decoder, and SGD everywhere keeps float32 comparisons tight.
DEEPSPEED_CASE = {
    "classifier": [],
    "seq2seq": [
        f"seq2seq.{part}.{key}"
        for part in ("encoder", "decoder")
        for key in ("name=sgd", "momentum=0.9", "clip_grad_norm=0.3")
    ],
    "gan": ["gan.generator.name=sgd", "gan.generator.momentum=0.9", "gan.generator.lr=0.05"],
}
DEEPSPEED_CASE["gan_r1"] = DEEPSPEED_CASE["gan"]
DEEPSPEED_CASE["seq2seq_ac"] = DEEPSPEED_CASE["seq2seq"]  # tests.cases.RECIPES adds activation checkpointing


def save_deepspeed_checkpoint(engine_config: str, output_dir: str) -> dict:
    """Train the classifier two steps under DeepSpeed, save a checkpoint, return the full weights."""
    trainer = make_trainer("classifier", "short", 2, output_dir, 2, f"deepspeed_config={engine_config}", float64=False)
    for step in range(2):
        trainer.train_step(step)
    trainer.models["model"].save_checkpoint(f"{output_dir}/checkpoint")
    with trainer.engine.full_weights(trainer.recipe.models["model"]):
        return named_params({"model": trainer.recipe.models["model"]})


def environment(name: str) -> tuple[str | None, str]:
    """What a process sees: the variable `name`, and where temporary files go."""
    import os
    import tempfile

    return os.environ.get(name), tempfile.gettempdir()


def fail_one_rank(how: str, output_dir: str) -> None:
    """Rank 1 dies or stops answering after set-up; rank 0 trains into the silence."""
    import os
    import time

    cfg = case_config("classifier", "full", 2, 1, output_dir, 50, "collective_timeout_s=3", "checkpoint_every=0")
    trainer = Trainer(cfg)
    if trainer.rank == 1:
        if how == "dies":
            os._exit(1)
        time.sleep(8)  # hung: no collective for longer than the timeout
        return
    trainer.fit()


def poisoned_steps(output_dir: str, poisoned_step: int, poisoned_rank: int, steps: int = 4) -> dict:
    """Train with a NaN loss on one process in one step; report what each step did to the weights."""
    cfg = case_config("classifier", "full", world_size_from_env(), 1, output_dir, steps, "on_nonfinite=skip")
    trainer = Trainer(cfg)
    losses, current = trainer.recipe.losses, [0]

    def poisoned(models, batch):
        for term, loss in losses(models, batch):
            bad = current[0] == poisoned_step and trainer.rank == poisoned_rank
            yield term, loss * float("nan") if bad else loss

    trainer.recipe.losses = poisoned
    moved = []
    for step in range(steps):
        current[0] = step
        before = named_params(trainer.recipe.models)
        result = trainer.train_step(step)
        after = named_params(trainer.recipe.models)
        moved.append(any(not torch.equal(before[k], after[k]) for k in before))
        assert result.phases[0].update.nonfinite == (step == poisoned_step)
    return {"moved": moved, "skipped": trainer.nonfinite_steps, "params": named_params(trainer.recipe.models)}


# FSDP: the block classes each recipe shards as units of their own (the classifier's layers too, so
# that a model holds several units there as well).
FSDP_MODES = {
    "ddp": [],
    "fsdp": ["fsdp.enabled=true"],
    "fsdp_every": ["fsdp.enabled=true", "fsdp.sync_every_micro_batch=true"],
    "fsdp_keep": ["fsdp.enabled=true", "fsdp.reshard_after_forward=false"],
    "fsdp_bf16": ["fsdp.enabled=true", "mixed_precision=bf16"],
    "fsdp_ac": ["fsdp.enabled=true", "activation_checkpointing=true"],
}


def make_fsdp_trainer(recipe: str, window: str, accumulation: int, mode: str, output_dir: str, steps: int, *extra: str):
    """A float64 trainer in `mode`: a key of FSDP_MODES, or "fsdp_offload" (fsdp.cpu_offload=true)."""
    from disttrain.recipes.classifier.recipe import ClassifierRecipe

    # seq2seq names its Transformer layers as blocks; the classifier names none, and here every
    # Linear becomes a unit of its own (units inside a model's unit).
    ClassifierRecipe.shard_blocks = (torch.nn.Linear,)
    name = f"run_name={recipe}-{window}-a{accumulation}-{mode}"
    if mode == "fsdp_offload":
        # Preflight refuses fsdp.cpu_offload without GPUs (the shards of a CPU mesh are in CPU memory
        # already); set past it, the engine's offload path (FSDP2's copies to and from the host, the
        # optimizer over offloaded shards) runs on the CPU mesh all the same: the only place this suite
        # can run it.
        return make_trainer(
            recipe, window, accumulation, output_dir, steps, *FSDP_MODES["fsdp"], name, *extra, past_checks=_offload
        )
    return make_trainer(recipe, window, accumulation, output_dir, steps, *FSDP_MODES[mode], name, *extra)


def _offload(cfg: Config) -> None:
    cfg.fsdp.cpu_offload = True


def whole(tensors: dict) -> dict[str, torch.Tensor]:
    """Full tensors of possibly sharded ones (a collective for DTensors), on the CPU."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone().cpu() for k, v in tensors.items()}


def fsdp_grads(models: dict) -> dict[str, torch.Tensor]:
    return whole(
        {
            f"{m}.{n}": p.grad
            for m, model in models.items()
            for n, p in unwrap(model).named_parameters()
            if p.grad is not None
        }
    )


def fsdp_params(models: dict) -> dict[str, torch.Tensor]:
    return whole({f"{m}.{n}": p for m, model in models.items() for n, p in unwrap(model).named_parameters()})


def seen_in_forward(models: dict) -> set[str]:
    """A set that collects the dtypes of the parameters every forward computes with."""
    seen: set[str] = set()

    def record(module, _):
        # After FSDP's own pre-forward hook (it is prepended): the gathered parameters, cast by the policy.
        seen.update(str(p.dtype) for p in module.parameters(recurse=False))

    for model in models.values():
        for module in model.modules():
            if any(True for _ in module.parameters(recurse=False)):
                module.register_forward_pre_hook(record)
    return seen


def fsdp_layout(models: dict, groups: list) -> dict:
    """Dtypes of the sharded parameters and of every optimizer state tensor, and the offload policies
    of the units (FSDP2 has no public reader for a unit's policy)."""
    from torch.distributed.fsdp import FSDPModule

    policies = [
        m._get_fsdp_state()._fsdp_param_group.offload_policy
        for model in models.values()
        for m in model.modules()
        if isinstance(m, FSDPModule) and m._get_fsdp_state()._fsdp_param_group is not None
    ]
    return {
        "sharded": {str(p.dtype) for model in models.values() for p in model.parameters()},
        "optimizer_state": {
            str(v.dtype)
            for g in groups
            for state in g.optimizer.state.values()
            for v in state.values()
            # per-parameter moments; Adam's step counter is a float32 scalar whatever the weights' dtype
            if torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0
        },
        "offload": {(type(p).__name__, getattr(p, "pin_memory", None)) for p in policies},
    }


def run_fsdp_cases(cases: list[tuple[str, str, int, str]], output_dir: str, steps: int = 3, *extra: str) -> dict:
    """Train each (recipe, window, accumulation, mode) case with float64 weights (mode: a key of
    FSDP_MODES); keep the whole gradients at every phase boundary, the final whole parameters, the
    reduce-scatter calls of every micro-step, the number of FSDP units that hold gradients, the
    dtypes forwards computed with and gradients were reduced in, and those of the sharded state
    (`fsdp_layout`)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    calls, reduced_in = [0], set()
    original = dist.reduce_scatter_single

    def counted(output, input, *args, **kwargs):
        calls[0] += 1
        reduced_in.add(str(input.dtype))
        return original(output, input, *args, **kwargs)

    dist.reduce_scatter_single = counted  # FSDP2 looks it up on the module at every reduction
    out = {}
    try:
        for recipe, window, accumulation, mode in cases:
            trainer = make_fsdp_trainer(recipe, window, accumulation, mode, output_dir, steps, *extra)
            computed_in = seen_in_forward(trainer.models)
            reduced_in.clear()
            grads, rounds = [], []
            for step in range(steps):
                for phase in trainer.recipe.phases(step):
                    per_micro_step, losses = [], phase.losses

                    def spying(models, batch, losses=losses, per_micro_step=per_micro_step):
                        per_micro_step.append(calls[0])  # the previous micro-step's backward is over
                        yield from losses(models, batch)

                    phase.losses = spying
                    calls[0] = 0
                    trainer.backward_window(phase)
                    per_micro_step.append(calls[0])
                    rounds.append([b - a for a, b in itertools.pairwise(per_micro_step)])
                    grads.append(fsdp_grads(trainer.models))
                    trainer.optimizer_step(phase)
                    assert not fsdp_grads(trainer.models), f"gradients left after the {phase.name} step"
            units = sum(isinstance(m, FSDPModule) for model in trainer.models.values() for m in model.modules())
            exported = {
                **fsdp_params(trainer.models),
                **named_params({k: v for k, v in trainer.recipe.exported_models().items() if k not in trainer.models}),
            }
            out[(recipe, window, accumulation, mode)] = {
                "grads": grads,
                "params": exported,
                "rounds": rounds,
                "units": units,
                "computed_in": computed_in,
                "reduced_in": set(reduced_in),
                **fsdp_layout(trainer.models, trainer.groups),
            }
    finally:
        dist.reduce_scatter_single = original
    return out


def fsdp_checkpoint_run(
    output_dir: str, steps: int, save_at: int = 0, resume_from: str = "", name: str = "run"
) -> dict:
    """Train seq2seq (two optimizers, AdamW) under FSDP in float64 for `steps` steps; write a checkpoint
    after `save_at` steps, or start from the checkpoint `resume_from`. Returns the whole parameters,
    the checkpoint's path and the step the run started at."""
    extra = ["checkpoint_every=0", f"run_name={name}", *([f"resume={resume_from}"] if resume_from else [])]
    trainer = make_fsdp_trainer("seq2seq", "short", 1, "fsdp", output_dir, steps, *extra)
    start, saved = trainer.start_step, ""
    for step in range(start, steps):
        trainer.train_step(step)
        if step + 1 == save_at:
            saved = trainer.save_checkpoint(save_at)
    return {"params": fsdp_params(trainer.models), "checkpoint": saved, "start": start}


def local_shards(state: dict) -> dict:
    from torch.distributed.tensor import DTensor

    return {k: v.to_local() if isinstance(v, DTensor) else v for k, v in state.items()}


def fsdp_first_checkpoint(output_dir: str) -> str:
    """One FSDP step and the run's first checkpoint, with the package as it is."""
    trainer = make_fsdp_trainer("classifier", "short", 1, "fsdp", output_dir, 1, "checkpoint_every=0")
    trainer.train_step(0)
    return trainer.save_checkpoint(1)


# Speed features (test_speed.py): torch.compile with the aot_eager backend (Dynamo and AOTAutograd,
# no code generation: seconds to compile) and activation checkpointing, against eager runs.
COMPILED = ["compile=true", "compile_backend=aot_eager"]


def speed_cases(output_dir: str, steps: int = 3) -> dict:
    """seq2seq with the auxiliary loss (two terms, variable lengths) in float64: eager and compiled
    weights, the compiled run's DDP all-reduce rounds per micro-step and its graph count; and the
    boundary gradients with dropout on, with and without activation checkpointing."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from disttrain.speed.compiling import compiled_graphs

    out: dict = {}
    eager = make_trainer("seq2seq_aux", "short", 3, output_dir, steps, "run_name=eager")
    for step in range(steps):
        eager.train_step(step)
    out["eager"] = named_params(eager.recipe.models)

    graphs_before = compiled_graphs()
    compiled = make_trainer("seq2seq_aux", "short", 3, output_dir, steps, *COMPILED, "run_name=compiled")
    calls, per_micro_step = [0], []
    if compiled.world_size > 1:

        def counting_hook(state, bucket):
            calls[0] += bucket.is_last()
            return allreduce_hook(state, bucket)

        compiled.models["seq2seq"].register_comm_hook(None, counting_hook)
    original = compiled.recipe.losses

    def spying(models, batch):
        per_micro_step.append(calls[0])  # the previous micro-step's backward is over
        yield from original(models, batch)

    compiled.recipe.losses = spying
    for step in range(steps):
        phase = compiled.recipe.phases(step)[0]
        per_micro_step.append(("window", step))
        compiled.backward_window(phase)
        per_micro_step.append(calls[0])
        compiled.optimizer_step(phase)
    out["compiled"] = named_params(compiled.recipe.models)
    out["rounds"] = per_micro_step
    out["graphs"] = compiled_graphs() - graphs_before

    for name, extra in (("plain", []), ("checkpointed", ["activation_checkpointing=true"])):
        trainer = make_trainer(
            "seq2seq_aux", "short", 3, output_dir, steps, "seq2seq.dropout=0.3", f"run_name={name}", *extra
        )
        grads = []
        for step in range(steps):
            phase = trainer.recipe.phases(step)[0]
            trainer.backward_window(phase)
            grads.append(named_grads(trainer.models))
            trainer.optimizer_step(phase)
        out[name] = grads
        out[f"{name}_blocks"] = trainer.checkpointed_blocks
    return out


def compiled_engine_cases(output_dir: str, steps: int = 3) -> dict:
    """seq2seq compiled (aot_eager) on FSDP2 (float64, against DDP eager) and on DeepSpeed ZeRO 2
    (float32, against DeepSpeed eager); whole final weights."""
    from disttrain.speed.compiling import compiled_graphs

    out: dict = {}
    for name, mode, extra in (("ddp", "ddp", []), ("fsdp_compiled", "fsdp", COMPILED)):
        trainer = make_fsdp_trainer("seq2seq", "short", 2, mode, output_dir, steps, f"run_name=s-{name}", *extra)
        before = compiled_graphs()
        for step in range(steps):
            trainer.train_step(step)
        out[name] = fsdp_params(trainer.models)
        out[f"{name}_graphs"] = compiled_graphs() - before
    zero2 = "configs/deepspeed/zero2.json"
    for name, extra in (("zero2", []), ("zero2_compiled", COMPILED)):
        out[name] = run_engine_cases([("seq2seq", "short", 2, zero2)], output_dir, steps, f"run_name=z-{name}", *extra)[
            ("seq2seq", "short", 2, zero2)
        ]
    return out


def wait_forever(out_dir: str) -> None:
    """Announce this rank (a file named by its pid), then wait: a process for the suite's own
    clean-up to end (test_suite_hygiene.py)."""
    import os
    import time

    open(os.path.join(out_dir, str(os.getpid())), "w").close()
    time.sleep(3600)


# The classifier with BatchNorm, trained through fit(): its printed accuracy must be that of its saved
# weights, whose running statistics each process updates from its own micro-batches.
BATCHNORM_RUN = ["classifier.batchnorm=true", "classifier.num_eval=2048", "tracker=none", "checkpoint_every=0"]
BATCHNORM_STEPS = 6


def batchnorm_runs(output_dir: str) -> dict:
    """Each engine's run (DDP, FSDP2): the metrics fit() returned, its run directory, and this
    process's running statistics at the end."""
    out = {}
    for mode in ("ddp", "fsdp"):
        extra = [*BATCHNORM_RUN, *FSDP_MODES[mode], f"run_name=batchnorm-{mode}"]
        cfg = case_config("classifier", "full", world_size_from_env(), 1, output_dir, BATCHNORM_STEPS, *extra)
        trainer = Trainer(cfg)
        metrics = trainer.fit()
        model = trainer.recipe.models["model"]
        stats = {k: v.detach().cpu().clone() for k, v in model.named_buffers() if "running" in k}
        out[mode] = {"metrics": metrics, "run_dir": trainer.run_dir, "stats": stats}
    return out
