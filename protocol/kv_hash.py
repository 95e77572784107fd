"""Content hashes of full KV blocks: the keys of the prefix cache, of KV events and of
cache-aware dispatch (design §4).

Block i of a request is identified by a chain: h_i = H(h_{i-1}, the block's token ids), with
h_{-1} = the request's root, H(namespace, cache_salt), and the namespace H(model, dtype): two
blocks have the same hash exactly when they hold the same tokens after the same prefix, under a
model and dtype that give them the same KV, for the same tenant salt. A worker announces its
namespace and block size when it registers, so the frontend computes the very keys the engines
store without knowing their model or dtype, and hashes of other models never match. BLAKE2b
truncated to 64 bits: stable across processes and machines (unlike Python's `hash` of str); at
2^-64 per pair a collision is far less likely than a hardware fault. Pure Python, no torch.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

HASH_BYTES = 8


def _h(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=HASH_BYTES).digest(), "little")


def namespace_hash(model: str, dtype: str) -> int:
    """What, besides tokens and salt, decides a block's KV: the model (with anything that picks its
    weights) and the KV dtype. Never 0 (0 on the wire means "no prefix caching")."""
    return _h(b"kvferry-kv-ns-1\0" + model.encode() + b"\0" + dtype.encode()) or 1


def root_from_namespace(namespace: int, cache_salt: str = "") -> int:
    """The parent of a request's first block."""
    return _h(b"kvferry-kv-1\0" + namespace.to_bytes(HASH_BYTES, "little") + cache_salt.encode())


def root_hash(model: str, dtype: str, cache_salt: str = "") -> int:
    """The parent of a request's first block: what, besides the tokens, decides its KV."""
    return root_from_namespace(namespace_hash(model, dtype), cache_salt)


def block_hash(parent: int, tokens: Sequence[int]) -> int:
    return _h(parent.to_bytes(HASH_BYTES, "little") + array("q", tokens).tobytes())


def extend_hashes(hashes: list[int], token_ids: Sequence[int], block_size: int, num_blocks: int,
                  root: int) -> list[int]:
    """Append to `hashes` (the chain of the first len(hashes) blocks of `token_ids`) the hashes
    of blocks up to `num_blocks` (each full); returns `hashes`."""
    parent = hashes[-1] if hashes else root
    for i in range(len(hashes), num_blocks):
        parent = block_hash(parent, token_ids[i * block_size:(i + 1) * block_size])
        hashes.append(parent)
    return hashes


def prompt_hashes(token_ids: Sequence[int], block_size: int, root: int) -> list[int]:
    """The hashes of every full block of `token_ids`."""
    return extend_hashes([], token_ids, block_size, len(token_ids) // block_size, root)
