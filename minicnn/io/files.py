"""What every reader and writer of minicnn.io shares: atomic writes, and telling what a file is
before a parser meets it, so that a bad file gives one ValueError naming the file and what was
expected (never a raw BadZipFile or NumPy's advice about pickles).
"""
from __future__ import annotations

import os
import tempfile

# the first bytes of the formats minicnn reads or is likely to be handed by mistake
_SIGNATURES = (
    (b"PK\x03\x04", "a zip archive (.npz or .keras)"),
    (b"PK\x05\x06", "an empty zip archive"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (.h5)"),
    (b"\x93NUMPY", "a single NumPy array (.npy)"),
    (b"\x80", "a Python pickle"),
    (b"\x89PNG", "a PNG image"),
    (b"\x08", "a protobuf file (e.g. .onnx)"),
)


def describe(path) -> str:
    """What the file at ``path`` looks like from its first bytes: 'empty', 'a zip archive'..."""
    with open(path, "rb") as stream:
        head = stream.read(8)
    if not head:
        return "an empty file"
    for signature, kind in _SIGNATURES:
        if head.startswith(signature):
            return kind
    return f"something else (first bytes {head!r})"


def check_file(path, expected: str, signature: bytes) -> str:
    """``path`` as a str, after checking it exists and starts with ``signature``; ValueError
    naming the file, what was ``expected`` and what it looks like otherwise."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, expected {expected}")
    with open(path, "rb") as stream:
        head = stream.read(len(signature))
    if head != signature:
        raise ValueError(f"{path} is not {expected}: it is {describe(path)}")
    return path


def not_readable(path, expected: str, error: Exception) -> ValueError:
    """The ValueError for a file that starts right but does not parse (truncated, corrupt)."""
    return ValueError(f"{os.fspath(path)} is not a readable {expected} (truncated or corrupt: "
                      f"{type(error).__name__}: {error})")


def write_atomic(path, write) -> None:
    """Call ``write(stream)`` on a temporary file in ``path``'s folder, flush it to disk, then
    rename it over ``path``: a crash mid-save leaves the previous file whole."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path),
                                         dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def write_text_atomic(path, text: str) -> None:
    """Write a text file (UTF-8) through a temporary file and a rename."""
    write_atomic(path, lambda stream: stream.write(text.encode("utf-8")))
