"""Turn text files into memory-mapped tokens: `python -m disttrain.prepare [key=value ...]`.

    python -m disttrain.prepare                                   # the default corpus, into the cache recipe=causal_lm reads
    python -m disttrain.prepare corpus=~/texts out=data/texts     # every file under ~/texts
    python -m disttrain.prepare corpus=~/texts out=data/texts-bpe tokenizer=/path/to/hf_tokenizer_dir

Keys:
  corpus=DIR          a directory of text files, one document each; default: the Python standard library
                      of this interpreter (its *.py sources; installed packages left out), the same on
                      every machine that has this Python, no download
  pattern=GLOB        file names to take, comma-separated globs; default *.py for the default corpus, * otherwise
  out=DIR             where to write; default for the default corpus: the cache that recipe=causal_lm reads
                      ($DISTTRAIN_CACHE, else $XDG_CACHE_HOME/disttrain, else ~/.cache/disttrain)
  tokenizer=bytes     bytes (default): one token per byte, vocabulary 256 + a begin-of-document token;
                      or a local Hugging Face tokenizer directory (never downloaded)
  eval_fraction=0.05  share of documents held out, chosen by a hash of each file's relative path (the
                      same split on every machine and every run; at least one document in each split)

Writes <out>/train.bin, train.idx, eval.bin, eval.idx and meta.json (layout: disttrain/data/tokens.py).
Files are sorted by path, so the result is the same byte for byte on every run. Everything is written
in a directory beside <out> and then renamed into place, meta.json last: a reader, or a second process
preparing the same directory at the same time, never sees half of it. Hidden files and folders,
__pycache__, site-packages and dist-packages are skipped, as are empty files.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from disttrain.data.tokens import BYTES, FORMAT, META, SPLITS, bin_path, idx_path, is_prepared, read_meta, token_dtype

SKIPPED_DIRS = {"__pycache__", "site-packages", "dist-packages"}
DEFAULT_EVAL_FRACTION = 0.05


class PrepareError(ValueError):
    """Arguments or a corpus that cannot be prepared; the message names the key and the fix."""


@dataclass(frozen=True)
class Options:
    corpus: str = ""  # empty: the standard library
    pattern: str = ""  # empty: *.py for the standard library, * otherwise
    out: str = ""  # empty: the cache directory of the default corpus
    tokenizer: str = BYTES
    eval_fraction: float = DEFAULT_EVAL_FRACTION

    @property
    def corpus_dir(self) -> str:
        return os.path.abspath(os.path.expanduser(self.corpus)) if self.corpus else stdlib_dir()

    @property
    def patterns(self) -> list[str]:
        return [p for p in (self.pattern or ("*" if self.corpus else "*.py")).split(",") if p]

    def same_source(self, other: Options) -> bool:
        """Whether both prepare the same data (wherever they write it)."""
        mine = (self.corpus_dir, self.patterns, self.tokenizer, self.eval_fraction)
        return mine == (other.corpus_dir, other.patterns, other.tokenizer, other.eval_fraction)


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def cache_root() -> str:
    if os.environ.get("DISTTRAIN_CACHE"):
        return os.path.expanduser(os.environ["DISTTRAIN_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "disttrain")


def default_data_dir() -> str:
    """Where the default corpus (this interpreter's standard library, byte tokens) is prepared.

    Named after the interpreter and the format, so another Python or a new layout is a new directory.
    """
    version = ".".join(map(str, sys.version_info[:3]))
    key = hashlib.sha256(f"{stdlib_dir()}|{FORMAT}|{DEFAULT_EVAL_FRACTION}".encode()).hexdigest()[:10]
    return os.path.join(cache_root(), "tokens", f"stdlib-{version}-{key}")


# --------------------------------------------------------------------------- documents


def list_documents(corpus: str, patterns: list[str]) -> list[str]:
    """Relative paths of the corpus's documents, sorted (the order of the token files)."""
    found = []
    for root, dirs, files in os.walk(corpus):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and any(fnmatch.fnmatch(name, p) for p in patterns):
                found.append(os.path.relpath(os.path.join(root, name), corpus))
    return sorted(found)


def held_out_score(relative_path: str) -> float:
    """A number in [0, 1) fixed by the path alone: documents below eval_fraction are held out."""
    digest = hashlib.sha256(relative_path.replace(os.sep, "/").encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(paths: list[str], eval_fraction: float) -> dict[str, list[str]]:
    """Held-out documents by hash of their path; each split gets at least one document."""
    scores = {p: held_out_score(p) for p in paths}
    held = {p for p in paths if scores[p] < eval_fraction}
    if not held:
        held = {min(paths, key=scores.__getitem__)}
    if len(held) == len(paths):
        held.discard(max(held, key=scores.__getitem__))
    return {"train": [p for p in paths if p not in held], "eval": [p for p in paths if p in held]}


# --------------------------------------------------------------------------- tokenizers


class ByteTokens:
    """One token per byte (0-255) and 256 for the start of a document: no vocabulary to download."""

    name = BYTES
    vocab_size = 257
    bos = 256

    def encode(self, raws: list[bytes]) -> list[tuple[np.ndarray, bytes]]:
        return [(np.frombuffer(raw, dtype=np.uint8), raw) for raw in raws]


class HFTokens:
    """A local Hugging Face tokenizer; each document starts with its begin (else end) of text token."""

    def __init__(self, path: str):
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise PrepareError(f"tokenizer={path} needs transformers: make install EXTRAS=transformers") from e
        if not os.path.isdir(path):
            raise PrepareError(f"tokenizer={path}: no such directory; give a local tokenizer directory, or bytes")
        self.name = os.path.abspath(path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.name, local_files_only=True)
        self.vocab_size = len(self.tokenizer)
        bos = self.tokenizer.bos_token_id
        self.bos = bos if bos is not None else self.tokenizer.eos_token_id
        if self.bos is None:
            raise PrepareError(f"tokenizer={path} has neither a begin nor an end of text token to start documents with")

    def encode(self, raws: list[bytes]) -> list[tuple[np.ndarray, bytes]]:
        # Invalid UTF-8 is replaced, and the bytes counted are those of the text the tokens stand for.
        texts = [raw.decode("utf-8", errors="replace") for raw in raws]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [(np.asarray(i, dtype=np.int64), t.encode()) for i, t in zip(ids, texts, strict=True)]


def load_tokenizer(name: str) -> ByteTokens | HFTokens:
    return ByteTokens() if name == BYTES else HFTokens(os.path.expanduser(name))


# --------------------------------------------------------------------------- writing


def _batches(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _write_split(
    directory: str, split: str, corpus: str, paths: list[str], tokens: ByteTokens | HFTokens
) -> dict[str, Any]:
    """Stream the split's documents into <split>.bin and <split>.idx; return its counts."""
    dtype = token_dtype(tokens.vocab_size)
    histogram = np.zeros(256, dtype=np.int64)
    digest = hashlib.sha256()  # names the content: a rerun over changed files is never taken for the same
    rows = [(0, 0)]
    with open(bin_path(directory, split), "wb") as out:
        for batch in _batches(paths, 256):
            raws = []
            for path in batch:
                with open(os.path.join(corpus, path), "rb") as f:
                    raws.append(f.read())
            for ids, text in tokens.encode(raws):
                document = np.empty(len(ids) + 1, dtype=dtype)
                document[0] = tokens.bos
                document[1:] = ids
                out.write(document.tobytes())
                digest.update(document.tobytes())
                histogram += np.bincount(np.frombuffer(text, dtype=np.uint8), minlength=256)
                rows.append((rows[-1][0] + len(document), rows[-1][1] + len(text)))
        out.flush()
        os.fsync(out.fileno())
    index = np.asarray(rows, dtype=np.int64)
    with open(idx_path(directory, split), "wb") as out:
        out.write(index.tobytes())
        out.flush()
        os.fsync(out.fileno())
    p = histogram[histogram > 0] / max(1, histogram.sum())
    return {
        "documents": len(paths),
        "tokens": int(index[-1, 0]),
        "bytes": int(index[-1, 1]),
        "unigram_bits_per_byte": float(-(p * np.log2(p)).sum()),
        "sha256": digest.hexdigest(),
    }


@contextlib.contextmanager
def _locked(out: str) -> Iterator[bool]:
    """Hold `<out>.lock` (exclusive), so that processes preparing one directory do it once; yields
    whether the lock is held (a file system without locks still gets whole directories: the rename)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield False
        return
    lock = out + ".lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(lock)
            yield False
            return
        try:  # the holder before removed the file it locked: lock the one now under that name
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield True
    finally:
        # Removed while still held: a process waiting on this file then finds it gone and retries.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def _publish(staged: str, out: str, meta: dict[str, Any]) -> None:
    """Move a fully written directory into place: at once when `out` is new, file by file (meta.json
    removed first and written last) over an existing one."""
    try:
        os.rename(staged, out)
        return
    except OSError:
        if not os.path.isdir(out):
            raise
    with contextlib.suppress(OSError, ValueError):
        if read_meta(out) == meta:  # a second process prepared the same thing: keep the first
            shutil.rmtree(staged)
            return
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out, META))
    for name in sorted(os.listdir(staged)):
        if name != META:
            os.replace(os.path.join(staged, name), os.path.join(out, name))
    os.replace(os.path.join(staged, META), os.path.join(out, META))
    shutil.rmtree(staged)


def prepare(options: Options, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Tokenise the corpus into `options.out` (or the default cache); returns its meta."""
    out = os.path.abspath(os.path.expanduser(options.out)) if options.out else default_data_dir()
    _check_paths(options, out)
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with _locked(out) as exclusive:
            return _prepare_holding_lock(options, out, exclusive, say)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise PrepareError(f"out={options.out or out}: cannot be written: {e.strerror or e}{where}") from e


def _check_paths(options: Options, out: str) -> None:
    corpus = options.corpus_dir
    if not os.path.isdir(corpus):
        raise PrepareError(f"corpus={options.corpus}: no such directory")
    real_out, real_corpus = os.path.realpath(out), os.path.realpath(corpus)
    if os.path.commonpath([real_out, real_corpus]) == real_corpus:
        raise PrepareError(
            f"out={options.out or out} lies inside corpus={corpus}: the next prepare would read train.bin and "
            "meta.json as documents; choose an out= outside the corpus"
        )
    if os.path.exists(out) and not os.path.isdir(out):
        raise PrepareError(f"out={options.out or out} is an existing file, not a directory; choose a directory")


def _prepare_holding_lock(options: Options, out: str, exclusive: bool, say: Callable[[str], None]) -> dict[str, Any]:
    corpus = options.corpus_dir
    if not 0 < options.eval_fraction < 1:
        raise PrepareError(f"eval_fraction={options.eval_fraction} must lie strictly between 0 and 1")
    tokens = load_tokenizer(options.tokenizer)
    paths = [p for p in list_documents(corpus, options.patterns) if os.path.getsize(os.path.join(corpus, p))]
    if len(paths) < 2:
        raise PrepareError(
            f"corpus={corpus}: {len(paths)} non-empty file(s) match pattern={','.join(options.patterns)}; "
            "a train and a held-out split need at least 2"
        )
    parent = os.path.dirname(out)
    if exclusive:  # nobody else is preparing here: what a killed run left beside it can go
        for name in os.listdir(parent):
            if name.startswith(os.path.basename(out) + ".tmp-"):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    staged = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staged, 0o777 & ~umask)  # mkdtemp's 0700 would hide the published directory from other users
    try:
        splits = split_documents(paths, options.eval_fraction)
        meta: dict[str, Any] = {
            "format": FORMAT,
            "tokenizer": tokens.name,
            "vocab_size": tokens.vocab_size,
            "bos_token": int(tokens.bos),
            "dtype": token_dtype(tokens.vocab_size).name,
            "corpus": corpus,
            "pattern": ",".join(options.patterns),
            "eval_fraction": options.eval_fraction,
            "splits": {s: _write_split(staged, s, corpus, splits[s], tokens) for s in SPLITS},
        }
        with open(os.path.join(staged, META), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _publish(staged, out, meta)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    say(describe(out, meta))
    return meta


def describe(out: str, meta: dict[str, Any]) -> str:
    tokenizer = "byte tokens" if meta["tokenizer"] == BYTES else f"tokenizer {meta['tokenizer']}"
    lines = [f"prepared {out}: {tokenizer} (vocabulary {meta['vocab_size']}) from {meta['corpus']}"]
    for split in SPLITS:
        s = meta["splits"][split]
        lines.append(
            f"  {split:<5} {s['documents']:>6} documents {s['tokens']:>11,} tokens {s['bytes']:>11,} bytes, "
            f"unigram byte entropy {s['unigram_bits_per_byte']:.3f} bits per byte"
        )
    return "\n".join(lines)


def ensure_default_data(say: Callable[[str], None] = print) -> str:
    """The default corpus's prepared directory, prepared first if it is not there yet.

    Several processes starting at once (`accelerate launch`) prepare it once: one holds the lock
    and prepares, the others wait for it and then find it complete.
    """
    out = default_data_dir()
    if is_prepared(out):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with _locked(out) as exclusive:
        if not is_prepared(out):
            say(
                f"causal_lm: preparing the default corpus (this Python's standard library, byte tokens) into {out}, "
                "once (a few seconds)"
            )
            _prepare_holding_lock(Options(), out, exclusive, say)
    return out


# --------------------------------------------------------------------------- the command


def parse(argv: list[str]) -> Options:
    keys = {"corpus", "pattern", "out", "tokenizer", "eval_fraction"}
    values: dict[str, Any] = {}
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq or arg.startswith("-"):
            raise PrepareError(f"argument '{arg}' is not of the form key=value (keys: {', '.join(sorted(keys))})")
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"the keys are {', '.join(sorted(keys))}"
            raise PrepareError(f"unknown key '{key}'; {hint}")
        values[key] = value
    if "eval_fraction" in values:
        try:
            values["eval_fraction"] = float(values["eval_fraction"])
        except ValueError:
            raise PrepareError(f"eval_fraction={values['eval_fraction']} is not a number") from None
        if not math.isfinite(values["eval_fraction"]):
            raise PrepareError(f"eval_fraction={values['eval_fraction']} must be a finite number")
    options = Options(**values)
    if not options.out and not options.same_source(Options()):
        # The cache directory recipe=causal_lm reads by default holds the default preparation only.
        given = ", ".join(f"{k}=" for k in sorted(values))
        raise PrepareError(f"{given} need out=DIR: without it, only the default corpus with default keys is prepared")
    return options


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__)
        return 0
    try:
        prepare(parse(argv))
    except PrepareError as e:
        print(f"prepare error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
