"""Short stable hashes, without OpenSSL.

hashlib maps OpenSSL (about 3 MB of RSS) into the process on import; five
stages run on every node, and they only need a stable digest of a short
string (anomaly ids, file names).  The _blake2 module is CPython's own.
"""
try:
    from _blake2 import blake2b
except ImportError:  # pragma: no cover - a Python built without _blake2
    from hashlib import blake2b


def hexdigest(text: str, size: int) -> str:
    """`size` bytes of BLAKE2b of `text`, as 2*size hex digits; stable across runs."""
    return blake2b(text.encode("utf-8"), digest_size=size).hexdigest()
