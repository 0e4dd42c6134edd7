"""Triton kernels for sampling: grammar bitmasks applied to a batch of logits in place.

Bitmask layout (the one ``fsm.guide.TokenGuide.allowed_mask`` produces): row ``i`` of a
packed ``[R, W]`` int32 (or uint32 viewed as int32) tensor holds one bit per token, bit
``j`` (``1 << j``, least significant first) of word ``w`` allowing token ``32 * w + j``.
Row ``i`` of the bitmask applies to logits row ``rows[i]``; the other logits rows are not
touched. Tokens whose bit is clear, and tokens at or past ``32 * W`` (a mask narrower than
the logits, e.g. a model vocabulary padded past the tokenizer's), become ``-inf``; bits past
the logits width are ignored. This is what ``Constraints.mask_logits`` does with torch ops on
CPU.

One launch covers the batch: program ``(i, v)`` handles ``BLOCK_V`` tokens of row
``rows[i]``, loading the ``BLOCK_V / 32`` words that cover them and expanding them to
per-token bits in registers, and stores ``-inf`` only where a token is disallowed (allowed
logits are never read or written).

Under ``TRITON_INTERPRET=1`` (CPU tests) the kernel runs in Triton's interpreter; blocks are
then small (``default_block_v``). bfloat16 logits work there too: the kernel only stores a
constant, which the interpreter encodes correctly (it stores bfloat16 as raw ``uint16``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_interpreted() -> bool:
    """Whether the kernels of this module were built for Triton's CPU interpreter."""
    return type(_apply_bitmask_kernel).__name__ == "InterpretedFunction"


@triton.jit
def _apply_bitmask_kernel(
    Logits,
    Bitmask,
    Rows,
    vocab,
    num_words,
    stride_lb,
    stride_lv,
    stride_mb,
    BLOCK_V: tl.constexpr,
):
    """Program ``(i, v)``: tokens ``v * BLOCK_V ...`` of logits row ``Rows[i]``, mask row ``i``."""
    i = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * BLOCK_V
    row = tl.load(Rows + i).to(tl.int64)

    offs_w = start // 32 + tl.arange(0, BLOCK_V // 32)
    words = tl.load(Bitmask + i * stride_mb + offs_w, mask=offs_w < num_words, other=0)
    bits = (words[:, None] >> tl.arange(0, 32)[None, :]) & 1
    disallowed = tl.reshape(bits == 0, [BLOCK_V])

    offs_v = start + tl.arange(0, BLOCK_V)
    ptrs = Logits + row * stride_lb + offs_v.to(tl.int64) * stride_lv
    neg_inf = tl.full([BLOCK_V], float("-inf"), dtype=Logits.dtype.element_ty)
    tl.store(ptrs, neg_inf, mask=disallowed & (offs_v < vocab))


def default_block_v(device: torch.device) -> int:
    """Tokens per program: 64 under the interpreter (which runs each program in Python),
    else 4096 (128 words of mask, 32 tokens per thread with 4 warps)."""
    if is_interpreted() or device.type != "cuda":
        return 64
    return 4096


def apply_token_bitmask_(
    logits: torch.Tensor,
    bitmask: torch.Tensor,
    rows: torch.Tensor | None = None,
    block_v: int | None = None,
    num_warps: int = 4,
) -> None:
    """In place: ``logits[rows[i], t] = -inf`` for every token ``t`` that row ``i`` of
    ``bitmask`` does not allow (see the module docstring for the layout).

    ``logits`` ``[B, V]`` float32, float16 or bfloat16; ``bitmask`` ``[R, W]`` int32 (or
    uint32), last dim contiguous; ``rows`` ``[R]`` int32 or int64 logits row indices, distinct
    and in ``[0, B)`` (not checked: that would synchronize with the device); None means
    ``arange(B)``, with ``R == B``. All on the same device. ``block_v``: a power of two, at
    least 32.
    """
    if logits.dim() != 2 or bitmask.dim() != 2:
        raise ValueError(
            f"logits must be [B, V] and bitmask [R, W], got {tuple(logits.shape)} and "
            f"{tuple(bitmask.shape)}"
        )
    if logits.dtype not in _DTYPES:
        raise TypeError(f"unsupported logits dtype {logits.dtype}; use float32/16 or bfloat16")
    if bitmask.dtype == torch.uint32:
        bitmask = bitmask.view(torch.int32)
    if bitmask.dtype != torch.int32:
        raise TypeError(f"bitmask must be int32 (packed bits), got {bitmask.dtype}")
    if bitmask.numel() > bitmask.shape[0] and bitmask.stride(1) != 1:
        raise ValueError("bitmask's last dim must be contiguous")
    if rows is None:
        if bitmask.shape[0] != logits.shape[0]:
            raise ValueError(
                f"without rows, bitmask needs one row per logits row: "
                f"{bitmask.shape[0]} != {logits.shape[0]}"
            )
        rows = torch.arange(logits.shape[0], dtype=torch.int32, device=logits.device)
    if rows.dim() != 1 or rows.numel() != bitmask.shape[0]:
        raise ValueError(f"rows must be [R] with R = {bitmask.shape[0]}, got {tuple(rows.shape)}")
    if rows.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"rows must be int32 or int64, got {rows.dtype}")
    if not (logits.device == bitmask.device == rows.device):
        raise ValueError(
            f"logits, bitmask and rows must share a device: {logits.device}, "
            f"{bitmask.device}, {rows.device}"
        )
    num_rows, vocab = rows.numel(), logits.shape[1]
    if num_rows == 0 or vocab == 0:
        return
    block_v = block_v or default_block_v(logits.device)
    if block_v < 32 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two >= 32, got {block_v}")
    grid = (num_rows, triton.cdiv(vocab, block_v))
    _apply_bitmask_kernel[grid](
        logits,
        bitmask,
        rows,
        vocab,
        bitmask.shape[1],
        logits.stride(0),
        logits.stride(1),
        bitmask.stride(0),
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
