"""Memory arithmetic shared by the renderer, the policy checker and the manifests' tests.

Ray keeps its object store in `/dev/shm`. A pod's `/dev/shm` is an emptyDir with
`medium: Memory`, whose pages count against the container's memory limit, so three numbers
must agree or the pod is OOM-killed (shm too big) or Ray silently falls back to a slow
disk-backed store (shm smaller than the object store):

    memory limit  >  /dev/shm sizeLimit  >  object-store-memory

We derive both from the memory limit so one number per pod is all anyone edits:
`/dev/shm` gets 30% of the limit (Ray's own default object-store fraction) and the object
store 80% of that, leaving room in shm for NCCL's and PyTorch's shared-memory segments.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

MIB = 1024 * 1024

SHM_PERCENT_OF_LIMIT = 30
OBJECT_STORE_PERCENT_OF_SHM = 80
# Ray refuses object stores below 75 MiB (ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES).
RAY_MIN_OBJECT_STORE_MIB = 75

_SUFFIX = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}
_QUANTITY = re.compile(
    r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$"
)


def parse_quantity(value: str | int | float) -> Decimal:
    """Parse a Kubernetes resource quantity ("500m", "4Gi", "1e3", 2) into a Decimal."""
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    number, suffix = match.groups()
    return Decimal(number) * Decimal(_SUFFIX[suffix] if suffix else 1)


def shm_mib(memory_limit_mib: int) -> int:
    """`/dev/shm` sizeLimit (MiB) for a container with this memory limit (MiB)."""
    return memory_limit_mib * SHM_PERCENT_OF_LIMIT // 100


def object_store_bytes(memory_limit_mib: int) -> int:
    """`object-store-memory` (bytes, whole MiB) for a container with this memory limit."""
    return shm_mib(memory_limit_mib) * OBJECT_STORE_PERCENT_OF_SHM // 100 * MIB


def mib_of(quantity: str | int) -> int:
    """Whole MiB in a quantity, rounded down (limits are written in Mi/Gi in practice)."""
    return math.floor(parse_quantity(quantity) / MIB)
