"""Real text that needs no download: the Python standard library's own source files, as bytes.

The corpus is the ``*.py`` files under ``sysconfig.get_paths()["stdlib"]`` (third-party packages in
``site-packages``/``dist-packages`` and the standard library's test suites excluded). Tokens are
bytes (0..255) plus one end-of-file token, so the vocabulary has 257 entries.

Everything is deterministic and independent of filesystem listing order:

- a file's *key* is the SHA-1 of its path relative to the stdlib root (POSIX separators);
- a file is in the validation split when ``key mod 1000 < 1000 * valid_fraction`` — the split is by
  file, so no validation file contributes a byte to training;
- within each split files are taken in key order (a fixed pseudo-random order that does not favour
  any package) until the split's byte budget is reached.

The same Python version therefore always yields the same corpus; a different version's stdlib yields
a different, equally valid one (the split rule and order are unchanged).
"""

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB_SIZE = 257
EOF_TOKEN = 256
EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_source_files(root=None):
    """Relative POSIX paths of the standard library's non-test ``*.py`` files, sorted."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise ValueError(f"root: {root} is not a directory")
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.isdisjoint(rel.parts[:-1]) and path.is_file():
            files.append(rel.as_posix())
    return sorted(files)


def file_key(relpath: str) -> int:
    """Stable pseudo-random key of a file, from its relative path only."""
    return int.from_bytes(hashlib.sha1(relpath.encode("utf-8")).digest()[:8], "big")


def is_validation(relpath: str, valid_fraction: float) -> bool:
    """Whether a file belongs to the validation split (decided by its path alone)."""
    return file_key(relpath) % 1000 < round(1000 * valid_fraction)


@dataclass(frozen=True)
class ByteCorpus:
    """Training and validation token streams (int64, values < VOCAB_SIZE) and the files in each."""

    train: torch.Tensor
    valid: torch.Tensor
    train_files: tuple
    valid_files: tuple


def _encode(root: Path, files, max_bytes: int):
    """Concatenate files (each followed by EOF_TOKEN) in the given order until max_bytes tokens."""
    chunks, taken, total = [], [], 0
    for rel in files:
        if total >= max_bytes:
            break
        data = bytearray((root / rel).read_bytes()[: max_bytes - total - 1])
        chunk = torch.full((len(data) + 1,), EOF_TOKEN, dtype=torch.int64)
        if data:
            chunk[:-1] = torch.frombuffer(data, dtype=torch.uint8)
        chunks.append(chunk)
        taken.append(rel)
        total += chunk.numel()
    if not chunks:
        raise ValueError("no source files to read (is the split or the byte budget empty?)")
    return torch.cat(chunks), tuple(taken)


def load_corpus(train_bytes=4_000_000, valid_bytes=400_000, valid_fraction=0.1, root=None):
    """Read the byte corpus: disjoint train/validation files, each split capped at its byte budget.

    A file cut by the budget contributes only its first bytes; no file is in both splits.
    """
    if train_bytes < 2 or valid_bytes < 2:
        raise ValueError(
            f"train_bytes and valid_bytes must be >= 2, got {train_bytes}, {valid_bytes}"
        )
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    root = Path(root) if root is not None else stdlib_root()
    files = sorted(list_source_files(root), key=lambda rel: (file_key(rel), rel))
    valid_files = [f for f in files if is_validation(f, valid_fraction)]
    train_files = [f for f in files if not is_validation(f, valid_fraction)]
    train, train_taken = _encode(root, train_files, train_bytes)
    valid, valid_taken = _encode(root, valid_files, valid_bytes)
    return ByteCorpus(train, valid, train_taken, valid_taken)


def random_windows(stream: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    """A batch of random contiguous windows: inputs (B, T) and next-token targets (B, T)."""
    if stream.numel() < seq_len + 1:
        raise ValueError(
            f"stream of {stream.numel()} tokens is shorter than seq_len + 1 = {seq_len + 1}"
        )
    starts = torch.randint(0, stream.numel() - seq_len, (batch_size,), generator=generator)
    windows = torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def fixed_windows(stream: torch.Tensor, num_windows: int, seq_len: int):
    """Evenly spaced windows covering the stream (the same every call): inputs and targets."""
    if stream.numel() < seq_len + 1:
        raise ValueError(
            f"stream of {stream.numel()} tokens is shorter than seq_len + 1 = {seq_len + 1}"
        )
    last = stream.numel() - seq_len - 1
    starts = torch.linspace(0, last, num_windows).round().long().unique()
    windows = torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]
