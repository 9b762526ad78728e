"""Prove a recipe exact: `python -m disttrain.check recipe=<name or module> [key=value ...]`.

The recipe trains a few steps on CPU with several gloo processes (2 and 4 by default), with
accumulation, a shorter last window and a window shorter than the number of processes, and is
compared with one process that takes each global batch as a single micro-batch, in float64 where
its models allow. One verdict line per check; the exit status is 0 only when all pass.

Options (before or among the key=value arguments):
  --worlds 2,4       process counts to check
  --float32          keep the recipe's own precision; DeepSpeed always does. The tolerance of each
                     value is then derived from the run: 10 x the difference between two one-process
                     references that split the same batches differently (at least 1e-4 relative)

Any run key may be given (`deepspeed_config=configs/deepspeed/zero2.json` checks the DeepSpeed
engine, `fsdp.enabled=true` FSDP2). Use a scaled-down configuration of your model: the check is
about the recipe's losses, counts and phases, not its size.
"""

from __future__ import annotations

import math
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

GLOBAL_BATCH = 24  # divisible by 1, 2 and 4 processes x 3 micro-batches
ACCUMULATION = 3
# Data sizes whose second epoch starts with a shorter window: 13 samples (shorter than the global
# batch), 3 samples (fewer than 4 processes: a process runs a stand-in with weight 0).
CASES = {"shorter last window": (2 * GLOBAL_BATCH + 13, 3), "window shorter than the processes": (GLOBAL_BATCH + 3, 2)}
FLOAT64_TOLERANCE = 1e-7
# In float32 the rounding of a split batch differs from the whole batch's, and adaptive optimizers
# (RMSprop, Adam with a small eps) amplify it in the weights: each value's tolerance is SAFETY x the
# difference a second one-process reference makes that only splits the batches differently, and at
# least FLOAT32_FLOOR. That spread is trusted as rounding only while the first window's gradients
# (computed at the same weights) agree within TRUSTED_SPREAD; beyond it the split itself changed the
# result, the floor applies, and the comparisons with several processes name the mistake.
FLOAT32_FLOOR = 1e-4
SAFETY = 10.0
TRUSTED_SPREAD = 1e-3
# Text the tokens of a language-model batch: a "labels" tensor with this index for unscored positions
# (the convention of Hugging Face models and torch's cross_entropy).
LABELS, IGNORE_INDEX = "labels", -100


@dataclass
class Verdict:
    status: str  # PASS, FAIL or WARN
    check: str
    detail: str = ""
    fix: str = ""


@dataclass
class Run:
    """What one process count produced: gradients at every boundary, final weights, or the error."""

    grads: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    start: dict[str, Any] = field(default_factory=dict)  # the weights before the first update
    error: str = ""


# --------------------------------------------------------------------------- inside each process


def _float64(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _float64(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_float64(v) for v in value)
    return value


def _to_float64(recipe: Any) -> None:
    """Every module the recipe holds (its models, an EMA copy) in float64; batches follow in `_phases`."""
    from torch import nn

    for value in vars(recipe).values():
        modules = value.values() if isinstance(value, dict) else [value]
        for module in modules:
            if isinstance(module, nn.Module):
                module.double()


def _phases(trainer: Any, step: int, float64: bool) -> list[Any]:
    phases = trainer.recipe.phases(step)
    if float64:
        for phase in phases:
            phase.make_batch = lambda plan, make=phase.make_batch: _float64(make(plan))
    return phases


def _grads(recipe: Any) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    # FSDP's gradients are shards: gathered whole (a collective, in the same order on every process).
    return {
        f"{name}.{p_name}": (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().double().clone()
        for name, model in recipe.models.items()
        for p_name, p in model.named_parameters()
        if p.grad is not None
    }


def _params(recipe: Any, trainer: Any) -> dict[str, Any]:
    out = {}
    for name, model in recipe.exported_models().items():
        with trainer.engine.full_weights(model):  # a collective: every process enters it
            # The main process's weights are compared; elsewhere FSDP's state_dict holds shards.
            if trainer.engine.is_main_process:
                out.update({f"{name}.{k}": v.detach().double().clone() for k, v in model.state_dict().items()})
    return out


def freeze_batchnorm_statistics(recipe: Any) -> None:
    """Make every BatchNorm layer normalise with its fixed running statistics, whatever mode the
    trainer sets. Batch statistics depend on how a batch is split by design; frozen, the model is a
    fixed function of its inputs and the accumulation around it is checkable."""
    from torch import nn

    for model in recipe.models.values():
        for layer in model.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                # before every forward: the trainer puts models in training mode at each step
                layer.register_forward_pre_hook(lambda module, args: setattr(module, "training", False))


def train_cases(argv: list[str], micro_batch_size: int, output_dir: str, float64: bool) -> dict:
    """Every case on this process: gradients after each phase's window, weights after the last step."""
    from accelerate.utils import set_seed

    from disttrain.config import world_size_from_env
    from disttrain.data.windows import WindowSampler
    from disttrain.preflight import resolve_config
    from disttrain.recipe import build_recipe
    from disttrain.trainer import Trainer

    results = {}
    for case, (samples, case_steps) in CASES.items():
        run = Run()
        results[case] = run
        args = [
            *argv,
            f"steps={case_steps}",
            f"global_batch_size={GLOBAL_BATCH}",
            f"micro_batch_size={micro_batch_size}",
            f"output_dir={output_dir}",
            f"run_name={case.replace(' ', '-')}-w{world_size_from_env()}-m{micro_batch_size}",
            "progress_bar=false",
            "tracker=none",
            "checkpoint_every=0",
            "resume=never",
            "collective_timeout_s=60",  # a process that failed ends the others' wait soon
        ]
        cfg = resolve_config(args)
        set_seed(cfg.seed)
        recipe = build_recipe(cfg)
        if float64:
            _to_float64(recipe)
        freeze_batchnorm_statistics(recipe)
        trainer = Trainer(cfg, recipe)
        # The same data for every process count: a dataset of `samples`, so that the case's window
        # shapes come at its last step.
        trainer.sampler = WindowSampler(min(samples, recipe.num_train), GLOBAL_BATCH, micro_batch_size, cfg.seed)
        try:
            run.start = _params(recipe, trainer)
            for step in range(case_steps):
                for phase in _phases(trainer, step, float64):
                    trainer.backward_window(phase)
                    run.grads.append(_grads(recipe))
                    trainer.optimizer_step(phase)
            run.params = _params(recipe, trainer)
        except Exception as e:  # the recipe's own error: reported, and the other cases left out
            run.error = f"{type(e).__name__}: " + str(e).strip().splitlines()[0].split(". ")[0]
            break
    return results


def inspect_recipe(argv: list[str], output_dir: str, float64: bool) -> list[Verdict]:
    """The checks that need one process: same sample per index, counts and losses that add up,
    a gradient for every trainable parameter, BatchNorm."""
    from accelerate.utils import set_seed
    from torch import nn

    from disttrain.data.windows import MicroBatchPlan
    from disttrain.preflight import resolve_config
    from disttrain.recipe import build_recipe

    cfg = resolve_config([*argv, f"output_dir={output_dir}", "tracker=none"], world_size=1)
    set_seed(cfg.seed)
    recipe = build_recipe(cfg)
    if float64:
        _to_float64(recipe)
    verdicts = []
    indices = list(range(min(8, recipe.num_train)))
    first, again = recipe.load_batch(MicroBatchPlan(indices)), recipe.load_batch(MicroBatchPlan(indices))
    if _same(first, again):
        verdicts.append(Verdict("PASS", "dataset: the same index gives the same sample"))
    else:
        verdicts.append(
            Verdict(
                "FAIL",
                "dataset: the same index gives the same sample",
                "the recipe's data (train_dataset or train_batch) gave other samples for the same indices on a second call",
                "derive any randomness of a sample from (seed, epoch, index), never from a global generator: "
                "processes and resumed runs must see the same data",
            )
        )
    if verdicts[-1].status == "FAIL":
        return verdicts  # the checks below compare batches built twice: they need the same data
    half = len(indices) // 2
    plans = [MicroBatchPlan(indices), MicroBatchPlan(indices[:half]), MicroBatchPlan(indices[half:], half)]
    for model in recipe.models.values():
        model.eval()  # dropout off: a loss over a batch must equal the sum over its halves
    token_verdicts: list[Verdict] = []
    for phase in recipe.phases(0):
        batches = [_float64(phase.make_batch(p)) if float64 else phase.make_batch(p) for p in plans]
        counts = [phase.item_counts(b) for b in batches]
        losses = [dict((t, float(loss.detach())) for t, loss in phase.losses(recipe.models, b)) for b in batches]
        not_finite = [t for t in phase.terms if not all(math.isfinite(loss[t]) for loss in losses)]
        if not_finite:  # every comparison below would hold NaN against NaN
            verdicts.append(
                Verdict(
                    "FAIL",
                    f"loss {', '.join(repr(t) for t in not_finite)} ({phase.name}) is finite",
                    f"it is {losses[0][not_finite[0]]} on the first {len(indices)} samples",
                    "look at the recipe's data and initialisation (a NaN input, a log of 0, a division by a zero "
                    "count); the other checks are left out until the loss is finite",
                )
            )
            return verdicts
        for term in phase.terms:
            whole, parts = float(counts[0][term]), float(counts[1][term]) + float(counts[2][term])
            if whole != parts:
                verdicts.append(
                    Verdict(
                        "FAIL",
                        f"item count of '{term}' ({phase.name})",
                        f"item_counts() gives {whole:g} for a batch and {parts:g} for its two halves together",
                        "count the items the loss sums over (valid tokens, not padded positions or a fixed number)",
                    )
                )
            loss_whole, loss_parts = losses[0][term], losses[1][term] + losses[2][term]
            if not _adds_up(loss_whole, loss_parts, float64):
                verdicts.append(
                    Verdict(
                        "FAIL",
                        f"loss '{term}' ({phase.name}) is not a sum over items",
                        f"the loss of a batch is {loss_whole:.6g}, of its two halves together {loss_parts:.6g}",
                        "losses() must return the sum over items (reduction='sum'), not a mean: the core divides "
                        "by the items of the whole window on all processes",
                    )
                )
        token_verdicts += _tokens_counted(phase, recipe.models, batches[0], counts[0], losses[0], float64)
    if not any(v.status == "FAIL" and v.check.startswith(("item count", "loss")) for v in verdicts):
        verdicts.append(Verdict("PASS", "item counts and losses add up over a split batch (sums, not means)"))
    verdicts += token_verdicts
    for model in recipe.models.values():
        model.train()
    unused = []
    for phase in recipe.phases(0):
        batch = phase.make_batch(MicroBatchPlan(indices))
        batch = _float64(batch) if float64 else batch
        trained = [p for name in phase.models for p in recipe.models[name].parameters()]
        for p in trained:
            p.grad = None
        for _, loss in phase.losses(recipe.models, batch):
            loss.backward()
        unused += [
            f"{name}.{p_name}"
            for name in phase.models
            for p_name, p in recipe.models[name].named_parameters()
            if p.requires_grad and p.grad is None
        ]
        for p in trained:
            p.grad = None
    if not unused:
        verdicts.append(Verdict("PASS", "every trainable parameter gets a gradient"))
    elif recipe.find_unused_parameters:
        verdicts.append(
            Verdict("WARN", "every trainable parameter gets a gradient", f"none reaches {', '.join(unused[:4])}")
        )
    else:
        verdicts.append(
            Verdict(
                "FAIL",
                "every trainable parameter gets a gradient",
                f"no gradient reaches {', '.join(unused[:4])}{' ...' if len(unused) > 4 else ''}",
                "set `find_unused_parameters = True` in the recipe (DDP must look for them), or freeze or "
                "remove those parameters",
            )
        )
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for model in recipe.models.values() for m in model.modules()):
        verdicts.append(
            Verdict(
                "WARN",
                "BatchNorm",
                "in training its statistics come from each micro-batch, so with accumulation or several processes "
                "the update is not the whole-batch one; the comparisons below run with its statistics frozen, "
                "which proves the accumulation around it",
                "for an update equal to the whole batch's: GroupNorm or LayerNorm, sync_batchnorm=true on GPUs, "
                "or no accumulation",
            )
        )
    return verdicts


def _tokens_counted(phase: Any, models: dict, batch: Any, counts: dict, losses: dict, float64: bool) -> list[Verdict]:
    """For a language-model batch (a 2-D `labels` tensor): split its scored tokens between two copies
    of it. A loss summed over tokens adds up over the copies; so must its item count, or it counts
    sequences: the same per-sequence factor on any process count, invisible to every other check."""
    import torch

    labels = batch.get(LABELS) if isinstance(batch, dict) else None
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or labels.is_floating_point():
        return []
    scored = labels != IGNORE_INDEX
    if not bool((scored.sum(1) >= 2).any()):
        return []  # no sequence has tokens to split
    first = scored & (scored.cumsum(1) <= (scored.sum(1, keepdim=True) + 1) // 2)
    copies = [{**batch, LABELS: labels.masked_fill(~part, IGNORE_INDEX)} for part in (first, scored & ~first)]
    split_counts = [phase.item_counts(c) for c in copies]
    with torch.no_grad():
        split_losses = [dict((t, float(loss.detach())) for t, loss in phase.losses(models, c)) for c in copies]
    verdicts = []
    for term in phase.terms:
        whole, parts = float(counts[term]), sum(float(c[term]) for c in split_counts)
        sums_tokens = _adds_up(losses[term], sum(loss[term] for loss in split_losses), float64)
        if sums_tokens and whole != parts:
            verdicts.append(
                Verdict(
                    "WARN",
                    f"items of '{term}' ({phase.name}) are its scored tokens",
                    f"the loss sums over tokens, but item_counts() gives {whole:g} for a batch and {parts:g} for "
                    "its scored tokens split between two copies of it: it counts sequences. Each window's token "
                    "losses are then divided by its number of sequences, so longer sequences weigh more and the "
                    "step size moves with the tokens per sequence. A per-sequence weighting may be intended: then "
                    "average each sequence's tokens in losses() before summing",
                    f"for the mean over tokens, count the scored tokens: ({LABELS} != {IGNORE_INDEX}).sum()",
                )
            )
        elif sums_tokens:
            verdicts.append(Verdict("PASS", f"items of '{term}' ({phase.name}) are its scored tokens"))
    return verdicts


def _adds_up(whole: float, parts: float, float64: bool) -> bool:
    """A loss of a batch against the sum of its parts' losses, within the precision's rounding."""
    return math.isclose(whole, parts, rel_tol=1e-6 if float64 else 1e-3, abs_tol=1e-9)


def _same(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def one_process(
    argv: list[str], output_dir: str, float64: bool
) -> tuple[list[Verdict], dict[str, Run], dict[str, Run]]:
    """The one-process checks and the reference runs, in one spawned process; no runs for a recipe
    whose loss is not finite (nothing could be compared). In float32 also the second reference, which
    splits each global batch into the micro-batches of an accumulation: the rounding to tolerate."""
    verdicts = inspect_recipe(argv, output_dir, float64)
    if any(v.status == "FAIL" and v.check.endswith("is finite") for v in verdicts):
        return verdicts, {}, {}
    reference = train_cases(argv, GLOBAL_BATCH, output_dir, float64)
    split = {} if float64 else train_cases(argv, GLOBAL_BATCH // ACCUMULATION, output_dir, float64)
    return verdicts, reference, split


# --------------------------------------------------------------------------- comparing


def relative_differences(run: Run, reference: Run) -> dict[str, float]:
    """Per compared value (each parameter's gradient at each boundary, then each final weight): the
    largest difference relative to the reference's largest magnitude of that tensor."""

    def relative(got: Any, expected: Any) -> float:
        return float((got - expected).abs().max()) / max(float(expected.abs().max()), 1e-12)

    out = {}
    for i, (got, expected) in enumerate(zip(run.grads, reference.grads, strict=True)):
        for name, value in expected.items():
            out[f"boundary {i}, {name}"] = relative(got[name], value)
    for name, value in reference.params.items():
        out[f"final weights, {name}"] = relative(run.params[name], value)
    return out


def comparable(run: Run, reference: Run) -> tuple[Run, Run]:
    """The two runs as they can be compared: DeepSpeed's ZeRO keeps gradients in its own partitions,
    so without gradients on either side the weights are what is compared."""
    if any(run.grads) or any(reference.grads):
        return run, reference
    return Run(params=run.params, start=run.start), Run(params=reference.params, start=reference.start)


@dataclass
class Tolerance:
    """Each compared value's tolerance: fixed in float64, else derived from the split reference."""

    floor: float
    spread: dict[str, float] = field(default_factory=dict)  # the split reference's differences

    def of(self, key: str) -> float:
        return max(self.floor, SAFETY * self.spread.get(key, 0.0))

    @property
    def derived(self) -> bool:
        return bool(self.spread)


def derive_tolerance(float64: bool, reference: Run, split: Run | None) -> Tolerance:
    if float64:
        return Tolerance(FLOAT64_TOLERANCE)
    if split is None or split.error or reference.error or len(split.grads) != len(reference.grads):
        return Tolerance(FLOAT32_FLOOR)
    import torch

    def share(difference: dict[str, Any], scale: dict[str, Any]) -> float:
        if difference.keys() != scale.keys() or not scale:
            return math.inf
        flat = torch.cat([(difference[k]).flatten() for k in scale])
        return float(flat.norm() / torch.cat([v.flatten() for v in scale.values()]).norm().clamp(min=1e-300))

    # Both references start from the same weights: first-window gradients that differ beyond rounding,
    # taken together (a parameter whose gradient is zero but for rounding differs entirely on its
    # own), mean the split changed the result, and the checks above say why. With weights only
    # (DeepSpeed's ZeRO keeps gradients in its partitions) the difference is measured against the
    # distance the weights moved, which an adaptive optimizer's amplified rounding stays well within.
    split, reference = comparable(split, reference)
    if split.grads:
        got, expected = split.grads[0], reference.grads[0]
        off = share({k: got[k] - v for k, v in expected.items() if k in got}, expected)
        trusted = off <= TRUSTED_SPREAD
    else:
        start = reference.start
        moved = {k: v - start[k] for k, v in reference.params.items() if k in start}
        off = share({k: split.params[k] - v for k, v in reference.params.items() if k in split.params}, moved)
        trusted = off <= 100 * TRUSTED_SPREAD
    if not trusted:
        return Tolerance(FLOAT32_FLOOR)
    spread = relative_differences(split, reference)
    return Tolerance(FLOAT32_FLOOR, spread)


def compare(
    world: int, case: str, run: Run, reference: Run, tolerance: Tolerance, counts_wrong: bool, inspected_ok: bool
) -> Verdict:
    """One process count's case against the reference: every boundary's gradients first, then the
    final weights, each value within its tolerance."""
    import torch

    what = f"{world} processes, {case}"
    if run.error:
        return Verdict("FAIL", what, run.error, _cause_of(run.error))
    if len(run.grads) != len(reference.grads):
        return Verdict("FAIL", what, f"{len(run.grads)} boundaries, the reference has {len(reference.grads)}")
    run, reference = comparable(run, reference)
    for i, (got, expected) in enumerate(zip(run.grads, reference.grads, strict=True)):
        if got.keys() != expected.keys():
            missing = sorted(expected.keys() ^ got.keys())[:3]
            return Verdict("FAIL", what, f"boundary {i}: parameters with a gradient differ ({', '.join(missing)})")
    differences = relative_differences(run, reference)
    gradients = {k: v for k, v in differences.items() if k.startswith("boundary")}
    weights = {k: v for k, v in differences.items() if k.startswith("final")}

    def worst(values: dict[str, float]) -> tuple[str, float, float]:
        key = max(values, key=lambda k: values[k] / tolerance.of(k), default="")
        return key, values.get(key, 0.0), tolerance.of(key)

    def said(key: str, value: float, limit: float) -> str:
        return f"worst relative difference {value:.1e} at {key}" + (
            f" (tolerance there {limit:.1e})" if tolerance.derived else ""
        )

    key, value, limit = worst(differences)
    if value <= limit:
        compared = f"gradients at {len(run.grads)} boundaries and the final weights" if run.grads else "final weights"
        return Verdict("PASS", what, f"{compared} equal the reference ({said(key, value, limit)})")
    split_hint = (
        "the loss of a micro-batch depends on how the batch is split: see the checks above"
        if not inspected_ok
        else "the one-process checks above pass, so what differs is the split over processes: look for state "
        "kept between micro-batches (a counter, a cache, statistics), randomness not derived from the sample, "
        "or code that reads the rank or the world size"
    )
    if not run.grads:
        return Verdict(
            "FAIL",
            what,
            said(key, value, limit),
            f"{split_hint}; without deepspeed_config the check compares the gradients of every window and "
            "names the factor they are off by",
        )
    g_key, g_value, g_limit = worst(gradients)
    if g_value <= g_limit:
        w_key, w_value, w_limit = worst(weights)
        return Verdict(
            "FAIL",
            what,
            f"the gradients at all {len(run.grads)} boundaries equal the reference's, the final weights do not: "
            + said(w_key, w_value, w_limit),
            "the accumulation is exact; the optimizer step differs: look for an optimizer, schedule or clipping "
            "setting that depends on the process count",
        )
    # A constant factor between the first window's gradients names the usual mistakes.
    got = torch.cat([g.flatten() for g in run.grads[0].values()])
    expected = torch.cat([g.flatten() for g in reference.grads[0].values()])
    factor = float(got @ expected / (expected @ expected).clamp(min=1e-300))
    residual = float((got - factor * expected).norm() / got.norm().clamp(min=1e-300))
    detail = said(g_key, g_value, g_limit)
    if residual < 1e-6 and abs(factor - 1) > 1e-6:
        micro = GLOBAL_BATCH // (world * ACCUMULATION)
        named = {
            ACCUMULATION: "the accumulation count",
            world * ACCUMULATION: "the micro-batches of a window",
            micro: "the micro-batch size",
            world: "the world size",
        }
        for number, meaning in named.items():
            for shown, ratio in ((f"{number}", number), (f"1/{number}", 1 / number)):
                if math.isclose(factor, ratio, rel_tol=1e-6):
                    detail = f"the gradients are {shown} x the reference's ({meaning}); {detail}"
                    if number == world and number not in (ACCUMULATION, micro, world * ACCUMULATION):
                        return Verdict(
                            "FAIL",
                            what,
                            detail,
                            "the world-size cancellation is defeated: do not divide "
                            "or multiply the loss by the number of processes in the recipe",
                        )
                    if counts_wrong:
                        return Verdict("FAIL", what, detail, "item_counts() does not count what the loss sums over")
                    return Verdict(
                        "FAIL",
                        what,
                        detail,
                        "losses() returns a mean, not a sum: return the sum over "
                        "items (reduction='sum') and let item_counts() say how many",
                    )
        detail = f"the gradients are {factor:.4g} x the reference's; {detail}"
    return Verdict("FAIL", what, detail, split_hint)


def _cause_of(error: str) -> str:
    if "left gradients in" in error:
        return "freeze the model a phase does not train (Phase.frozen), or detach what it passes on"
    if "Expected to have finished reduction" in error or "did not receive grad" in error:
        return "some parameters get no gradient: set `find_unused_parameters = True` in the recipe"
    return "see the error"


# --------------------------------------------------------------------------- the command


def parse(argv: list[str]) -> tuple[list[str], list[int], bool]:
    worlds, float64, rest = [2, 4], True, []
    items = iter(argv)
    for arg in items:
        if arg == "--worlds":
            given = next(items, "")
            try:
                worlds = [int(w) for w in given.split(",")]
            except ValueError:
                raise SystemExit(
                    f"--worlds needs process counts separated by commas, e.g. --worlds 2,4 (got {given!r})"
                ) from None
        elif arg == "--float32":
            float64 = False
        else:
            rest.append(arg)
    for world in worlds:
        if world < 1 or GLOBAL_BATCH % (world * ACCUMULATION):
            raise SystemExit(f"--worlds: {world} processes do not divide a global batch of {GLOBAL_BATCH} by 3")
    return rest, worlds, float64


def run_check(argv: list[str]) -> tuple[list[Verdict], str]:
    """Every verdict, and the header that says what was run."""
    from disttrain.preflight import resolve_config
    from disttrain.spawn import run_distributed

    args, worlds, float64 = parse(argv)
    cfg = resolve_config([*args, "tracker=none"], world_size=1)  # a bad key: one line, before any process
    float64 = float64 and not cfg.deepspeed_config
    precision = (
        f"float64 (tolerance {FLOAT64_TOLERANCE:g} relative)"
        if float64
        else f"the recipe precision (tolerance per value: {SAFETY:g} x the difference between the two "
        f"one-process references, at least {FLOAT32_FLOOR:g} relative)"
    )
    header = [
        f"disttrain.check: recipe={cfg.recipe}, engine {engine_name(cfg)}, {precision}",
        f"  reference: 1 process, each global batch of {GLOBAL_BATCH} as one micro-batch"
        + ("" if float64 else f"; and as {ACCUMULATION} micro-batches of {GLOBAL_BATCH // ACCUMULATION}"),
        "  checked:   "
        + "; ".join(
            f"{w} processes x {ACCUMULATION} micro-batches of {GLOBAL_BATCH // (w * ACCUMULATION)}" for w in worlds
        ),
        "  windows:   full, "
        + ", ".join(f"{case} ({samples % GLOBAL_BATCH} samples)" for case, (samples, _) in CASES.items()),
    ]
    with tempfile.TemporaryDirectory(prefix="disttrain-check-") as out:
        verdicts, reference, split = run_distributed(one_process, 1, args, out, float64)[0]
        for case, run in reference.items():
            if run.error:
                verdicts.append(Verdict("FAIL", f"the reference (1 process), {case}", run.error, _cause_of(run.error)))
        counts_wrong = any(v.status == "FAIL" and v.check.startswith("item count") for v in verdicts)
        inspected_ok = not any(v.status == "FAIL" for v in verdicts)
        tolerances = {case: derive_tolerance(float64, run, split.get(case)) for case, run in reference.items()}
        if not reference:
            worlds = []  # nothing to compare with
        for world in worlds:
            micro = GLOBAL_BATCH // (world * ACCUMULATION)
            runs = run_distributed(train_cases, world, args, micro, out, float64)[0]
            for case, run in runs.items():
                if reference[case].error:
                    continue  # the same mistake, already reported
                verdicts.append(
                    compare(world, case, run, reference[case], tolerances[case], counts_wrong, inspected_ok)
                )
    return verdicts, "\n".join(header)


def engine_name(cfg: Any) -> str:
    """The engine as the header names it: DeepSpeed with its ZeRO stage and what it offloads."""
    if not cfg.deepspeed_config:
        return "FSDP2" if cfg.fsdp.enabled else "DDP"
    from disttrain.deepspeed_config import load_user_config, zero_stage

    zero = load_user_config(cfg.deepspeed_config).get("zero_optimization", {})
    offloaded = [
        (words, str(zero[key]["device"]))
        for key, words in (("offload_optimizer", "optimizer state"), ("offload_param", "parameters"))
        if str(zero.get(key, {}).get("device", "none")).lower() not in ("none", "")
    ]
    offload = "".join(f", {words} offloaded to {device}" for words, device in offloaded)
    return f"DeepSpeed ZeRO {zero_stage(cfg)}{offload}"


def report(verdicts: list[Verdict], header: str) -> str:
    lines = [header, ""]
    for v in verdicts:
        lines.append(f"  {v.status}  {v.check}" + (f": {v.detail}" if v.detail else ""))
        if v.fix and v.status != "PASS":
            lines.append(f"        fix: {v.fix}")
    failed = [v for v in verdicts if v.status == "FAIL"]
    lines += ["", f"{len(failed)} of {len(verdicts)} checks failed" if failed else f"all {len(verdicts)} checks passed"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from disttrain.config import ConfigError

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        verdicts, header = run_check(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(report(verdicts, header), flush=True)
    return 1 if any(v.status == "FAIL" for v in verdicts) else 0


if __name__ == "__main__":
    # Through the module, not this __main__: spawned processes import the functions they run by name.
    from disttrain.check import main as check_main

    sys.exit(check_main())
