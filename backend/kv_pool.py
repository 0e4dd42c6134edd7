"""Token-granular KV pool: one slot holds the keys and values of one token in every layer.

Contract:
- Slot indices are int64 in ``[1, num_slots]``; slot 0 is a scratch slot that padded
  positions may write to and read from, never handed out.
- ``alloc(n)`` returns ``n`` distinct free slots or ``None`` when fewer than ``n`` are free
  (the caller evicts from the radix cache and retries); ``free`` returns slots to the pool.
- The pool does not know who owns a slot: the radix cache and the running requests do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from backend.config import KV_CACHE_DTYPES

if TYPE_CHECKING:
    from backend.config import EngineConfig
    from backend.models.llama import CausalLM

CPU_DEFAULT_SLOTS = 32768
"""KV pool size on the CPU when ``max_total_tokens`` is not given."""
GPU_MIN_SLOTS = 1024
"""Fewer slots than this in the memory left for the pool is an error, not a tiny engine."""


class KVPool:
    """Per-layer key and value buffers of shape ``[num_slots + 1, num_kv_heads, head_dim]``."""

    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_slots <= 0:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self.num_slots = num_slots
        self.device = torch.device(device)
        shape = (num_slots + 1, num_kv_heads, head_dim)
        self.k_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._free = torch.arange(1, num_slots + 1, dtype=torch.int64)
        # Freed slots wait here and join `_free` (after it, in order) when an allocation
        # needs them: freeing costs O(freed), not a copy of the whole free list.
        self._freed: list[torch.Tensor] = []
        self._num_freed = 0

    @property
    def num_free(self) -> int:
        return int(self._free.numel()) + self._num_freed

    def alloc(self, n: int) -> torch.Tensor | None:
        """Take ``n`` free slots (lowest indices first, so fresh runs are contiguous; then
        the freed ones in the order they were freed)."""
        if n > self._free.numel():
            if n > self.num_free:
                return None
            self._merge_freed()
        taken, self._free = self._free[:n], self._free[n:]
        return taken

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel():
            self._freed.append(slots.to(torch.int64).cpu())
            self._num_freed += int(slots.numel())

    def _merge_freed(self) -> None:
        if self._freed:
            self._free = torch.cat([self._free, *self._freed])
            self._freed, self._num_freed = [], 0

    def free_slots(self) -> list[int]:
        """Every free slot (for accounting checks)."""
        self._merge_freed()
        return self._free.tolist()

    def has_duplicate_free_slots(self) -> bool:
        self._merge_freed()
        return int(self._free.unique().numel()) != int(self._free.numel())

    def bytes_per_slot(self) -> int:
        k = self.k_buffers[0]
        return 2 * len(self.k_buffers) * k[0].numel() * k.element_size()


class ReqToTokenTable:
    """Row ``r`` lists, in order, the KV slots of every token of the request holding row ``r``.

    One ``[max_requests + 1, max_context_len]`` int64 table instead of a tensor per request:
    appending a decoded token's slot is one store, a request's slots are a zero-copy view,
    and GPU kernels read the whole table at once. Row 0 is a padding row.
    """

    def __init__(self, max_requests: int, max_context_len: int, device: torch.device | str = "cpu"):
        self.table = torch.zeros(
            (max_requests + 1, max_context_len), dtype=torch.int64, device=device
        )
        self._free_rows = list(range(max_requests, 0, -1))

    @property
    def num_free_rows(self) -> int:
        return len(self._free_rows)

    def alloc_row(self) -> int | None:
        return self._free_rows.pop() if self._free_rows else None

    def free_row(self, row: int) -> None:
        self._free_rows.append(row)


FLOAT8_MIN_CAPABILITY = (8, 9)
"""Compute capability from which Triton has float8 e4m3 (Ada, Hopper and later)."""


def kv_cache_dtype(name: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The pool dtype for ``EngineConfig.kv_cache_dtype`` ``name`` (``"auto"``: the model's).

    Raises ``ValueError`` for float8 on a GPU older than compute capability 8.9, where the
    attention kernels cannot be compiled for it."""
    torch_name = KV_CACHE_DTYPES[name]
    if torch_name is None:
        return model_dtype
    capability = torch.cuda.get_device_capability(device)
    if capability < FLOAT8_MIN_CAPABILITY:
        raise ValueError(
            f"kv_cache_dtype={name!r} needs a GPU of compute capability 8.9 or newer (Ada, "
            f"Hopper); {torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}: "
            "use kv_cache_dtype='auto'"
        )
    return getattr(torch, torch_name)


def kv_pool_capacity(
    model: CausalLM, dtype: torch.dtype, device: torch.device, config: EngineConfig
) -> int:
    """How many token slots the KV pool gets when ``max_total_tokens`` is not set.

    CPU: ``CPU_DEFAULT_SLOTS``. CUDA: after the weights are loaded, the pool takes what is
    left of ``config.mem_fraction_static`` of the device's total memory (memory already in
    use, by this process or others, counts against it); the rest is for activations, the
    logits and the CUDA graphs. Raises ``ValueError`` when that leaves fewer than
    ``GPU_MIN_SLOTS`` slots.
    """
    if device.type != "cuda":
        return CPU_DEFAULT_SLOTS
    free, total = torch.cuda.mem_get_info(device)
    per_slot = 2 * model.num_layers * model.num_kv_heads * model.head_dim * dtype.itemsize
    budget = total * config.mem_fraction_static - (total - free)
    slots = int(budget // per_slot)
    if slots < GPU_MIN_SLOTS:
        raise ValueError(
            f"only {max(budget, 0) / 2**30:.1f} GiB of GPU memory is left for the KV cache "
            f"({max(slots, 0)} token slots of {per_slot} bytes; {free / 2**30:.1f} of "
            f"{total / 2**30:.1f} GiB free): raise mem_fraction_static "
            f"({config.mem_fraction_static}) or free GPU memory"
        )
    return slots
