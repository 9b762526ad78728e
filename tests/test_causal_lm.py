"""recipe=causal_lm: the prepare command, the memory-mapped samples, document confinement with packing,
and the exact update against an independent whole-batch reference (DDP in float64, DeepSpeed ZeRO 2)."""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

pytest.importorskip(
    "transformers", reason="the causal_lm recipe needs the transformers extra: make install EXTRAS=transformers"
)

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

from disttrain.config import ConfigError
from disttrain.data.samples import load_samples
from disttrain.data.tokens import TokenSplit, is_prepared, read_meta
from disttrain.data.windows import WindowSampler
from disttrain.preflight import resolve_config
from disttrain.prepare import Options, PrepareError, held_out_score, main, parse, prepare
from disttrain.recipe import build_recipe
from disttrain.recipes.causal_lm.data import IGNORE, DocumentWindows, PackedBlocks, eval_batches, eval_documents
from tests.dist import run_distributed
from tests.launcher import PYTHON, REPO, accelerate, launch
from tests.test_equivalence import assert_same
from tests.test_reliability import tmpfs

BLOCK = 16
GLOBAL_BATCH = 12  # 2 processes x micro-batches of 2 x accumulation 3
SAMPLES = GLOBAL_BATCH + 5  # step 1 is a shorter window (5 samples), step 2 the first of epoch 1
STEPS = 3


# --------------------------------------------------------------------------- a small corpus


def write_corpus(root: str) -> dict[str, bytes]:
    """40 documents of 3 to 63 bytes (some shorter than a block, some longer) in two folders, and
    files that must be skipped; returns the documents by relative path."""
    docs = {}
    for i in range(40):
        text = f"doc {i} é: " + "the quick brown fox jumps over the lazy dog; " * 2
        data = text.encode()[: 3 + (i * 23) % 61]
        docs[os.path.join("ab"[i % 2], f"doc{i:02d}.txt")] = data
    for path, data in docs.items():
        os.makedirs(os.path.join(root, os.path.dirname(path)), exist_ok=True)
        with open(os.path.join(root, path), "wb") as f:
            f.write(data)
    for skipped in (".hidden.txt", "__pycache__/cached.txt", ".git/HEAD", "empty.txt"):
        os.makedirs(os.path.join(root, os.path.dirname(skipped)), exist_ok=True)
        with open(os.path.join(root, skipped), "wb") as f:
            f.write(b"" if skipped == "empty.txt" else b"never read")
    return docs


@functools.cache
def corpus() -> tuple[str, str, dict[str, bytes]]:
    """(corpus folder, prepared folder, documents), made once per session."""
    root = tempfile.mkdtemp(prefix="causal_lm-corpus-")
    atexit.register(shutil.rmtree, root, True)
    docs = write_corpus(os.path.join(root, "texts"))
    prepare(
        Options(corpus=os.path.join(root, "texts"), out=os.path.join(root, "prepared"), eval_fraction=0.2),
        lambda _: None,
    )
    return os.path.join(root, "texts"), os.path.join(root, "prepared"), docs


def read(directory: str, name: str) -> bytes:
    with open(os.path.join(directory, name), "rb") as f:
        return f.read()


def tiny(data: str, *extra: str) -> list[str]:
    """A scaled-down run of the recipe; SGD with a clip threshold that bites."""
    return [
        "recipe=causal_lm",
        f"causal_lm.data={data}",
        "causal_lm.layers=2",
        "causal_lm.width=16",
        "causal_lm.heads=2",
        f"causal_lm.block_size={BLOCK}",
        "causal_lm.eval_tokens=200",
        "causal_lm.sample_tokens=40",
        "causal_lm.optimizer.name=sgd",
        "causal_lm.optimizer.momentum=0.9",
        "causal_lm.optimizer.lr=0.5",
        "causal_lm.optimizer.clip_grad_norm=0.5",
        "causal_lm.optimizer.warmup_steps=0",
        "tracker=none",
        "progress_bar=false",
        *extra,
    ]


# --------------------------------------------------------------------------- the prepare command


def test_prepare_writes_documents_boundaries_split_and_meta():
    _, prepared, docs = corpus()
    meta = read_meta(prepared)
    assert sorted(os.listdir(prepared)) == ["eval.bin", "eval.idx", "meta.json", "train.bin", "train.idx"]
    assert (meta["tokenizer"], meta["vocab_size"], meta["bos_token"], meta["dtype"]) == ("bytes", 257, 256, "uint16")
    seen = {}
    for split in ("train", "eval"):
        s = TokenSplit(prepared, split)
        expected = sorted(p for p in docs if (held_out_score(p) < 0.2) == (split == "eval"))
        assert s.num_documents == len(expected) >= 1
        for i, path in enumerate(expected):  # documents in path order, each its BOS then its bytes
            start, end = s.document(i)
            assert s.tokens[start] == 256 and bytes(s.tokens[start + 1 : end].astype(np.uint8)) == docs[path]
            assert s.document_bytes(i) == len(docs[path])
            seen[path] = split
        text = b"".join(docs[p] for p in expected)
        counts = np.bincount(np.frombuffer(text, dtype=np.uint8), minlength=256)
        p = counts[counts > 0] / counts.sum()
        assert meta["splits"][split] == {
            "documents": len(expected),
            "tokens": len(text) + len(expected),
            "bytes": len(text),
            "unigram_bits_per_byte": pytest.approx(float(-(p * np.log2(p)).sum())),
            "sha256": hashlib.sha256(read(prepared, f"{split}.bin")).hexdigest(),
        }
    assert seen.keys() == docs.keys(), "every non-empty, non-hidden file is a document of one split"


def test_prepare_is_deterministic_and_replaces_atomically(tmp_path):
    texts, prepared, _ = corpus()
    again = tmp_path / "p" / "again"
    for _ in range(2):  # the second run finds the same content in place
        prepare(Options(corpus=texts, out=str(again), eval_fraction=0.2), lambda _: None)
        for name in os.listdir(prepared):
            assert (again / name).read_bytes() == read(prepared, name), name
    assert sorted(os.listdir(again.parent)) == ["again"], "nothing left beside it, the lock included"
    prepare(Options(corpus=texts, out=str(again), eval_fraction=0.5), lambda _: None)  # other content: replaced
    assert read_meta(str(again))["eval_fraction"] == 0.5 and sorted(os.listdir(again.parent)) == ["again"]
    assert TokenSplit(str(again), "eval").num_documents > TokenSplit(prepared, "eval").num_documents


def test_two_processes_preparing_one_directory_at_once_leave_it_whole(tmp_path):
    texts, prepared, _ = corpus()
    out = tmp_path / "p" / "shared"
    command = [sys.executable, "-m", "disttrain.prepare", f"corpus={texts}", f"out={out}", "eval_fraction=0.2"]
    runs = [
        subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    for run in runs:
        output, _ = run.communicate(timeout=120)
        assert run.returncode == 0, output
    assert is_prepared(str(out)) and sorted(os.listdir(out.parent)) == ["shared"]
    assert (out / "train.bin").read_bytes() == read(prepared, "train.bin")


def test_prepare_command_line():
    done = subprocess.run(
        [sys.executable, "-m", "disttrain.prepare", "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0 and "tokenizer=bytes" in done.stdout and "eval_fraction" in done.stdout
    typo = subprocess.run(
        [sys.executable, "-m", "disttrain.prepare", "tokeniser=x"], capture_output=True, text=True, cwd=REPO
    )
    assert typo.returncode == 2 and "did you mean 'tokenizer'" in typo.stderr
    with pytest.raises(PrepareError, match="need out=DIR"):
        parse(["corpus=/somewhere"])
    with pytest.raises(PrepareError, match="eval_fraction=nan must be a finite number"):
        parse(["eval_fraction=nan", "out=x"])
    assert parse(["pattern=*.py"]) == Options(pattern="*.py"), "the default corpus with its default keys needs no out="


BAD_OUTPUTS = {
    "the corpus itself": lambda texts, tmp: texts,
    "a folder inside the corpus": lambda texts, tmp: os.path.join(texts, "prepared"),
    "an existing file": lambda texts, tmp: os.path.join(tmp, "notes.txt"),
    "under /proc": lambda texts, tmp: "/proc/disttrain-prepared",
    "a read-only file system": lambda texts, tmp: os.path.join(tmp, "readonly", "prepared"),
}


@pytest.mark.parametrize("where", BAD_OUTPUTS)
def test_prepare_refuses_an_output_it_cannot_or_must_not_write_in_one_line(tmp_path, capsys, where):
    texts, _, _ = corpus()
    out = BAD_OUTPUTS[where](texts, str(tmp_path))
    before = sorted(os.listdir(texts))
    with contextlib.ExitStack() as stack:
        if where == "a read-only file system":
            stack.enter_context(tmpfs(tmp_path / "readonly", "ro"))
        if where == "an existing file":
            (tmp_path / "notes.txt").write_text("not a directory")
        assert main([f"corpus={texts}", f"out={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"prepare error: out={out}"), err
    assert sorted(os.listdir(texts)) == before, "nothing written into the corpus, no lock left"
    assert not os.path.exists(out + ".lock")


def test_prepare_with_a_local_hugging_face_tokenizer(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts, _, docs = corpus()
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(
        [d.decode() for d in docs.values()], trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<unk>"])
    )
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", unk_token="<unk>").save_pretrained(tmp_path / "tok")
    meta = prepare(
        Options(corpus=texts, out=str(tmp_path / "bpe"), tokenizer=str(tmp_path / "tok"), eval_fraction=0.2),
        lambda _: None,
    )
    assert meta["tokenizer"] == str(tmp_path / "tok") and meta["bos_token"] == 0 and meta["dtype"] == "uint16"
    split = TokenSplit(str(tmp_path / "bpe"), "train")
    first = sorted(p for p in docs if held_out_score(p) >= 0.2)[0]
    start, end = split.document(0)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")
    text = docs[first].decode("utf-8", errors="replace")  # a document cut inside a character
    assert split.tokens[start] == 0 and tokenizer.decode(split.tokens[start + 1 : end].tolist()) == text
    assert split.document_bytes(0) == len(text.encode())
    assert split.num_tokens - split.num_documents < split.num_bytes, "fewer tokens than bytes"


# --------------------------------------------------------------------------- the samples


def test_samples_are_lazy_and_pickle_without_their_tokens():
    _, prepared, _ = corpus()
    dataset = DocumentWindows(TokenSplit(prepared, "train"), BLOCK)
    assert dataset.split._tokens is None, "nothing is mapped before the first sample"
    load_samples(dataset, [0], seed=0, epoch=0)
    assert isinstance(dataset.split._tokens, np.memmap)
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy.split._tokens is None and len(pickle.dumps(dataset)) < 1000
    assert torch.equal(load_samples(copy, [3], 0, 0)[0]["input_ids"], load_samples(dataset, [3], 0, 0)[0]["input_ids"])


def test_document_windows_draw_chunks_from_the_sample_seed_and_pad_short_documents():
    _, prepared, _ = corpus()
    split = TokenSplit(prepared, "train")
    dataset = DocumentWindows(split, BLOCK)
    lengths = [split.document(i)[1] - split.document(i)[0] for i in range(len(dataset))]
    long = [i for i, n in enumerate(lengths) if n > BLOCK + 8]
    short = [i for i, n in enumerate(lengths) if n <= BLOCK]
    assert long and short

    def chunks(seed: int, epoch: int) -> list[torch.Tensor]:
        return [s["input_ids"] for s in load_samples(dataset, long, seed, epoch)]

    assert all(map(torch.equal, chunks(0, 0), chunks(0, 0))), "the same (seed, epoch, index): the same chunk"
    assert not all(map(torch.equal, chunks(0, 0), chunks(0, 1))), "another epoch draws other chunks"
    assert not all(map(torch.equal, chunks(0, 0), chunks(1, 0))), "another seed draws other chunks"
    for sample, i in zip(load_samples(dataset, long, 0, 0), long, strict=True):
        start, end = split.document(i)
        stream = torch.from_numpy(split.tokens[start:end].astype(np.int64))
        offset = next(o for o in range(end - start - BLOCK) if torch.equal(stream[o : o + BLOCK], sample["input_ids"]))
        assert torch.equal(sample["labels"], stream[offset + 1 : offset + BLOCK + 1])
    for sample, i in zip(load_samples(dataset, short, 0, 0), short, strict=True):
        assert int((sample["labels"] != IGNORE).sum()) == lengths[i] - 1, "padding is not scored"
    with pytest.raises(RuntimeError, match="sample_seed"):
        dataset[long[0]]  # outside the trainer's loading nobody says which chunk: refused, not random


def test_packed_blocks_restart_positions_and_skip_targets_at_document_starts():
    _, prepared, _ = corpus()
    split = TokenSplit(prepared, "train")
    blocks = PackedBlocks(split, BLOCK)
    assert len(blocks) == (split.num_tokens - 1) // BLOCK
    starts = set(split.index[:-1, 0].tolist())
    for i in range(len(blocks)):
        b = load_samples(blocks, [i], 0, 0)[0]
        tokens = split.tokens[i * BLOCK : i * BLOCK + BLOCK + 1].astype(np.int64)
        assert b["input_ids"].tolist() == tokens[:-1].tolist()
        for p in range(BLOCK):
            g = i * BLOCK + p
            opened = max([s for s in starts if i * BLOCK < s <= g] or [i * BLOCK])
            assert int(b["position_ids"][p]) == g - opened
            assert int(b["labels"][p]) == (IGNORE if g + 1 in starts else tokens[p + 1])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_packing_confines_attention_to_each_document(model, attention):
    """Changing the tokens of one document leaves the logits of the next one in the block unchanged,
    and they equal that document's logits on its own."""
    _, prepared, _ = corpus()
    cfg = resolve_config(
        [*tiny(prepared, f"causal_lm.model={model}", f"causal_lm.attention={attention}")], world_size=1
    )
    set_seed(0)
    recipe = build_recipe(cfg)
    net = recipe.models["model"].double().eval()
    blocks = PackedBlocks(TokenSplit(prepared, "train"), BLOCK)
    sample = next(
        s
        for s in (load_samples(blocks, [i], 0, 0)[0] for i in range(len(blocks)))
        if (s["position_ids"][1:] == 0).sum() >= 1
    )
    second = int((sample["position_ids"][1:] == 0).nonzero()[0]) + 1  # where the second document starts
    changed = sample["input_ids"].clone()
    changed[:second] = (changed[:second] + 7) % 256

    def logits(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return net(input_ids=ids[None], position_ids=positions[None], use_cache=False).logits[0]

    a, b = logits(sample["input_ids"], sample["position_ids"]), logits(changed, sample["position_ids"])
    alone = logits(sample["input_ids"][second:], sample["position_ids"][second:])
    assert not torch.allclose(a[:second], b[:second]), "the first document's own tokens matter"
    torch.testing.assert_close(a[second:], b[second:], rtol=0, atol=1e-12)
    # Llama's eager attention takes its softmax in float32 (over rows of other lengths here): its
    # rounding, not a leak, which is O(0.01) (seen with a cache object, which turns packing off).
    tolerance = 1e-6 if (model, attention) == ("llama", "eager") else 1e-12
    torch.testing.assert_close(a[second:], alone, rtol=tolerance, atol=tolerance)


def test_evaluation_scores_every_held_out_byte_once():
    _, prepared, _ = corpus()
    split = TokenSplit(prepared, "eval")
    documents = eval_documents(split, max_tokens=10**9)
    assert documents == list(range(split.num_documents))
    scored = sum(int((b["labels"] != IGNORE).sum()) for b in eval_batches(split, documents, BLOCK, 5))
    assert scored == split.num_bytes == split.num_tokens - split.num_documents
    few = eval_documents(split, max_tokens=40)
    assert sum(split.document(d)[1] - split.document(d)[0] for d in few) <= 40 and few


# --------------------------------------------------------------------------- config checks


def test_refusals_name_the_key_and_the_fix(tmp_path, monkeypatch):
    with pytest.raises(
        ConfigError,
        match=r"causal_lm.data=.*not a prepared directory; prepare it with: python -m disttrain.prepare corpus=",
    ):
        resolve_config(["recipe=causal_lm", f"causal_lm.data={tmp_path}"], world_size=1)
    with pytest.raises(ConfigError, match=re.escape("causal_lm.width=100 must be divisible by causal_lm.heads=3")):
        resolve_config(["recipe=causal_lm", "causal_lm.width=100", "causal_lm.heads=3"], world_size=1)
    with pytest.raises(ConfigError, match=re.escape("no config.json there")):
        resolve_config(["recipe=causal_lm", f"causal_lm.pretrained={tmp_path}"], world_size=1)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 100, "n_positions": 1024}))
    with pytest.raises(ConfigError, match="has a vocabulary of 100, the data's tokenizer 257"):
        resolve_config(["recipe=causal_lm", f"causal_lm.pretrained={tmp_path}"], world_size=1)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a)
    )
    with pytest.raises(
        ConfigError,
        match=r"needs the transformers package: make install EXTRAS=transformers",
    ):
        resolve_config(["recipe=causal_lm"], world_size=1)


@pytest.mark.parametrize(("model", "block"), [("gpt2", "GPT2Block"), ("llama", "LlamaDecoderLayer")])
def test_the_decoder_layers_are_the_blocks_fsdp_shards(model, block):
    """From the model's `_no_split_modules`, whatever the architecture."""
    _, prepared, _ = corpus()
    recipe = build_recipe(resolve_config(tiny(prepared, f"causal_lm.model={model}"), world_size=1))
    assert [c.__name__ for c in recipe.shard_blocks] == [block]


# --------------------------------------------------------------------------- the exact update


def reference(data: str, packing: bool) -> dict:
    """One process, float64, each global batch in ONE forward of the transformers model; the loss is
    torch's mean cross-entropy over the batch's scored tokens. None of the accumulation core, nor the
    recipe's losses or counts: only its model, data set and optimizer."""
    cfg = resolve_config(
        [
            *tiny(data, f"causal_lm.packing={packing}", "steps=3", f"global_batch_size={GLOBAL_BATCH}"),
            f"micro_batch_size={GLOBAL_BATCH}",
        ],
        world_size=1,
    )
    set_seed(cfg.seed)
    recipe = build_recipe(cfg)
    model = recipe.models["model"].double()
    group = recipe.groups[0]
    sampler = WindowSampler(SAMPLES, GLOBAL_BATCH, GLOBAL_BATCH, cfg.seed)
    grads, norms = [], []
    for step in range(STEPS):
        samples = load_samples(
            recipe.train_dataset, sampler.global_batch(step), cfg.seed, step // sampler.steps_per_epoch
        )
        batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE).backward()
        grads.append({f"model.{n}": p.grad.clone() for n, p in model.named_parameters()})
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(model.parameters()), group.clip_grad_norm)))
        group.optimizer.step()
        group.scheduler.step()
        model.zero_grad(set_to_none=True)
    return {
        "grads": grads,
        "params": {f"model.{n}": p.detach().clone() for n, p in model.named_parameters()},
        "norms": norms,
    }


def train_cases(data: str, cases: list[tuple[bool, str]], output_dir: str) -> dict:
    """On every rank: each (packing, engine) case trained STEPS steps on SAMPLES samples, 2 processes x
    micro-batches of 2; DDP and FSDP2 in float64 (whole gradients at every boundary), DeepSpeed in
    float32 (weights). Also the peers' scaling (each micro-batch's mean loss / the accumulation count)
    on DDP, and under FSDP2 the units and whether GPT-2's output layer still shares the embedding."""
    from torch.distributed.fsdp import FSDPModule

    from disttrain.config import world_size_from_env
    from disttrain.trainer import Trainer
    from disttrain.weights import shared_names
    from tests.workers import FSDP_MODES, whole

    out = {}
    for packing, engine in cases:
        extra = FSDP_MODES.get(engine, [f"deepspeed_config={engine}"])
        cfg = resolve_config(
            tiny(
                data,
                f"causal_lm.packing={packing}",
                f"steps={STEPS}",
                f"global_batch_size={GLOBAL_BATCH}",
                "micro_batch_size=2",
                f"output_dir={output_dir}",
                f"run_name={packing}-{os.path.basename(engine)}-w{world_size_from_env()}",
                "checkpoint_every=0",
                "save_weights=false",
                "resume=never",
                *extra,
            )
        )
        set_seed(cfg.seed)
        recipe = build_recipe(cfg)
        if engine in FSDP_MODES:  # float64: DDP and FSDP2
            recipe.models["model"].double()
        trainer = Trainer(cfg, recipe)
        trainer.sampler = WindowSampler(SAMPLES, GLOBAL_BATCH, 2, cfg.seed)
        grads, items = [], []
        for step in range(STEPS):
            phase = recipe.phases(step)[0]
            plans = trainer.sampler.window(step, trainer.rank, trainer.world_size)
            items.append(
                [int(recipe.item_counts(recipe.load_batch(p))["tokens"]) if not p.stand_in else 0 for p in plans]
            )
            trainer.backward_window(phase)
            grads.append(
                whole(
                    {
                        f"model.{n}": p.grad.detach().double()
                        for n, p in recipe.models["model"].named_parameters()
                        if p.grad is not None
                    }
                )
            )
            trainer.optimizer_step(phase)
        model = recipe.models["model"]
        with trainer.engine.full_weights(model):
            params = {f"model.{n}": p.detach().double().clone() for n, p in model.named_parameters()}
            # What write_weights stores: under FSDP2 the main process's whole tensors, each shared one once.
            state = model.state_dict()
            aliases = shared_names(state) if trainer.rank == 0 else None
        out[(packing, engine)] = {
            "grads": grads,
            "params": params,
            "items": items,
            "units": [type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)],
            "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight,
            "aliases": aliases,
        }
        if engine == "ddp":
            out[(packing, "naive")] = naive_first_window(cfg, data, trainer)
    return out


def naive_first_window(cfg, data: str, trained) -> dict:
    """Gradients of the first window when each micro-batch's loss is its own mean over its tokens,
    divided by the accumulation count (what transformers' Trainer did before 4.46)."""
    from disttrain.trainer import Trainer

    set_seed(cfg.seed)
    recipe = build_recipe(cfg)
    recipe.models["model"].double()
    cfg.run_name += "-naive"
    trainer = Trainer(cfg, recipe)
    plans = trained.sampler.window(0, trainer.rank, trainer.world_size)
    models = list(trainer.models.values())
    for i, plan in enumerate(plans):
        batch = recipe.load_batch(plan)
        with trainer.engine.sync_context(models, sync=i == len(plans) - 1):
            ((_, loss),) = recipe.losses(trainer.models, batch)
            trainer.engine.backward(loss / recipe.item_counts(batch)["tokens"] / len(plans), models)
    return {"grads": [{f"model.{n}": p.grad.detach().clone() for n, p in recipe.models["model"].named_parameters()}]}


def engines() -> list[str]:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return ["ddp", *FSDP]
    return ["ddp", *FSDP, ZERO2]


ZERO2 = "configs/deepspeed/zero2.json"
FSDP = ["fsdp", "fsdp_every"]  # modes of tests.workers.FSDP_MODES: sync once per window, after every micro-batch


CASES = [(packing, engine) for packing in (False, True) for engine in engines()]


@functools.cache
def distributed() -> list[dict]:
    _, prepared, _ = corpus()
    with tempfile.TemporaryDirectory() as out:
        return run_distributed(train_cases, 2, prepared, CASES, out, timeout=400)


@functools.cache
def whole_batch(packing: bool) -> dict:
    _, prepared, _ = corpus()
    return reference(prepared, packing)


@pytest.mark.slow  # one 2-process group for these: the full suite runs it
@pytest.mark.parametrize("packing", [False, True], ids=["windows", "packed"])
def test_ddp_update_equals_the_whole_batch_reference(packing):
    ref = whole_batch(packing)
    assert min(ref["norms"]) > 0.5, "the clip threshold bites"
    for rank, results in enumerate(distributed()):
        got = results[(packing, "ddp")]
        for step in range(STEPS):
            assert_same(got["grads"][step], ref["grads"][step], f"rank {rank} step {step} gradient", 1e-9, 1e-12)
        assert_same(got["params"], ref["params"], f"rank {rank} weights after {STEPS} steps", 1e-9, 1e-11)


@pytest.mark.slow  # one 2-process group for these: the full suite runs it
@pytest.mark.parametrize("packing", [False, True], ids=["windows", "packed"])
def test_the_cases_have_uneven_token_counts(packing):
    """Guards the comparison: tokens differ between the processes and between micro-batches."""
    ranks = distributed()
    for step in range(STEPS):
        per_rank = [sum(r[(packing, "ddp")]["items"][step]) for r in ranks]
        per_micro = [n for r in ranks for n in r[(packing, "ddp")]["items"][step]]
        assert len(set(per_rank)) > 1 and len(set(per_micro)) > 1, (step, per_rank, per_micro)


@pytest.mark.slow  # one 2-process group for these: the full suite runs it
@pytest.mark.parametrize("packing", [False, True], ids=["windows", "packed"])
def test_per_micro_batch_means_fail_the_reference(packing):
    naive = distributed()[0][(packing, "naive")]["grads"][0]
    with pytest.raises(AssertionError):
        assert_same(naive, whole_batch(packing)["grads"][0], "naive", 1e-6, 1e-9)


@pytest.mark.slow  # one 2-process group for these: the full suite runs it
@pytest.mark.parametrize("mode", FSDP)
@pytest.mark.parametrize("packing", [False, True], ids=["windows", "packed"])
def test_fsdp2_update_equals_the_whole_batch_reference_and_keeps_the_tie(packing, mode):
    """Each GPT2Block its own unit (the recipe's shard_blocks), the embeddings, final norm and the
    output layer tied to the input embedding in the model's; the same float64 reference as DDP."""
    ref = whole_batch(packing)
    for rank, results in enumerate(distributed()):
        got = results[(packing, mode)]
        assert got["units"] == ["FSDPGPT2LMHeadModel", "FSDPGPT2Block", "FSDPGPT2Block"], got["units"]
        # The uneven token counts test_the_cases_have_uneven_token_counts checks on DDP.
        assert got["items"] == results[(packing, "ddp")]["items"]
        assert got["tied"], f"rank {rank}: lm_head.weight is no longer transformer.wte.weight under fully_shard"
        if rank == 0:
            assert got["aliases"] == {"lm_head.weight": "transformer.wte.weight"}, "the weights file keeps the tie"
        for step in range(STEPS):
            assert_same(got["grads"][step], ref["grads"][step], f"rank {rank} step {step} gradient", 1e-9, 1e-12)
        assert_same(got["params"], ref["params"], f"rank {rank} weights after {STEPS} steps", 1e-9, 1e-11)


@pytest.mark.slow  # one 2-process group for these: the full suite runs it
@pytest.mark.skipif(ZERO2 not in engines(), reason="DeepSpeed is an extra: make install EXTRAS=deepspeed")
@pytest.mark.parametrize("packing", [False, True], ids=["windows", "packed"])
def test_deepspeed_zero2_update_equals_the_whole_batch_reference(packing):
    # float32 engines against the float64 reference: a wrong scale or a missed step is off by O(1).
    for results in distributed():
        assert_same(
            results[(packing, ZERO2)]["params"],
            whole_batch(packing)["params"],
            "ZeRO 2",
            1e-4,
            2e-6,
        )


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_the_exactness_check_passes_on_the_recipe():
    from disttrain.check import run_check

    _, prepared, _ = corpus()
    found, _ = run_check([*tiny(prepared, "causal_lm.packing=true"), "--worlds", "2"])
    assert all(v.status == "PASS" for v in found), [(v.check, v.detail) for v in found if v.status != "PASS"]
    assert "items of 'tokens' (train) are its scored tokens" in {v.check for v in found}  # counted in tokens


@pytest.mark.slow
def test_accelerate_launch_prepares_the_default_corpus_once_and_trains(tmp_path):
    """Two processes start at once with no data named: the standard library is prepared once, into
    the cache; the run writes weights, config.json and a sample; from_pretrained reads the run."""
    from transformers import AutoModelForCausalLM

    from disttrain.weights import read_weights

    env_cache = tmp_path / "cache"
    os.environ["DISTTRAIN_CACHE"] = str(env_cache)  # restored by conftest's _own_environment
    args = [
        a
        for a in tiny("", "steps=4", "global_batch_size=8", "micro_batch_size=2", "log_every=2")
        if not a.startswith("causal_lm.data=")
    ]
    run = launch(
        accelerate(), *args, f"output_dir={tmp_path / 'runs'}", "run_name=two", "data.num_workers=1", timeout=400
    )
    assert run.stdout.count("preparing the default corpus") == 1, run.stdout
    assert "2 process(es) x micro-batch 2 x accumulation 2 = global batch 8" in run.stdout
    done = [line for line in run.stdout.splitlines() if line.startswith("done: 4 steps")]
    assert len(done) == 1 and "bits per byte" in done[0] and "unigram byte entropy" in done[0], run.stdout
    run_dir = tmp_path / "runs" / "two"
    assert {"model.safetensors", "config.json", "sample.txt"} <= set(os.listdir(run_dir))
    assert os.path.getsize(run_dir / "sample.txt") > 0
    loaded = AutoModelForCausalLM.from_pretrained(run_dir, local_files_only=True)
    saved = read_weights(run_dir / "model.safetensors")
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight, "GPT-2 keeps its tied embedding"
    one = launch(PYTHON, *args, f"output_dir={tmp_path / 'runs'}", "run_name=one")
    assert "preparing" not in one.stdout, "the second run finds the prepared corpus"
    final = read_weights(tmp_path / "runs" / "one" / "model.safetensors")
    for name in saved:
        torch.testing.assert_close(saved[name], final[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert math.isfinite(float(done[0].split(" bits per byte")[0].rsplit(" ", 1)[1]))
