"""Engine configuration: one dataclass, validated, with defaults that suit a small CPU box."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

KV_CACHE_DTYPES = {"auto": None, "fp8_e4m3": "float8_e4m3fn"}
"""``kv_cache_dtype`` values and the torch dtype each stores (``None``: the model's)."""


@dataclass
class EngineConfig:
    """Options of the local engine.

    ``max_total_tokens`` is the KV pool size in token slots. Default: 32768 on CPU; on a
    GPU, what fits in ``mem_fraction_static`` of the device's memory (weights, KV pool and
    CUDA-graph buffers together) once the weights are loaded. ``chunked_prefill_size`` is the token
    budget of one prefill forward pass; longer prompts are prefilled in chunks. Default: 2048 on
    CPU, 8192 on CUDA (as SGLang on 80 GB GPUs: larger GEMMs; 256 x U(100, 1024) on an H100
    prefilled in 3.65 s against 3.91 with 2048).
    ``schedule_policy`` is ``"lpm"`` (longest cached prefix first, falling back to FCFS when
    more than ``lpm_max_queue`` requests wait), ``"fcfs"`` or ``"lof"`` (as SGLang's: the
    longest remaining ``max_new_tokens`` first, FCFS among equals; meant for offline
    batches: under a steady stream of long requests the short ones wait).
    Constrained decoding: jump-forward (appending forced text as one prefill) is on unless
    ``disable_regex_jump_forward``; JSON is compact unless
    ``constrained_json_whitespace_pattern`` (e.g. ``"[ \\n\\t]*"``) allows whitespace between
    tokens; undeclared object keys are generated only where the schema asks for them unless
    ``constrained_json_extra_properties`` (the JSON Schema default); compiling a constraint
    fails after ``constraint_compile_timeout`` seconds; the last ``constraint_cache_size``
    compiled constraints are kept.
    GPU: decode steps of up to ``cuda_graph_max_bs`` requests replay CUDA graphs captured at
    start-up unless ``disable_cuda_graph``; with graphs, each decode step is launched from the
    previous step's sampled ids on the device before the host processes them, unless
    ``disable_overlap_schedule``; prefill passes of up to 64 requests and
    ``cuda_graph_max_prefill_tokens`` new tokens (at most ``chunked_prefill_size``; 0: none)
    replay graphs too.
    ``enable_mixed_chunk`` (as SGLang's): a prefill pass also
    carries the next token of every running request, so they keep decoding while prompts
    are prefilled (their tokens count against ``chunked_prefill_size``).
    ``load_format="dummy"`` skips the checkpoint's
    weights and initializes them randomly (benchmarks: speed does not depend on the values;
    only ``config.json`` and the tokenizer are read).
    ``quantization`` (CPU only for now; refused on CUDA): ``"int4"`` stores the decoder's linear
    weights as Q4_1-style groups of 32 and the output projection as int8, ``"int8"`` stores all
    of them as per-channel int8 (``backend/quantization.py``; their matmuls round activations to
    bfloat16); embeddings, norms, attention and the KV cache stay ``dtype``.
    ``kv_cache_dtype``: ``"auto"`` stores keys and values in the model's dtype;
    ``"fp8_e4m3"`` (CUDA, compute capability >= 8.9) stores them as float8 e4m3 without
    scales (values round to nearest and saturate at +-448, as SGLang's and vLLM's unscaled
    fp8 caches do): half the bytes per token, so twice the slots and half the KV reads of
    a decode step; the kernels compute in the model's dtype after loading.
    """

    model: str | None = None
    device: str = "cpu"
    dtype: str = "auto"
    max_total_tokens: int | None = None
    mem_fraction_static: float = 0.88
    max_running_requests: int = 128
    context_length: int | None = None
    chunked_prefill_size: int | None = None
    schedule_policy: str = "lpm"
    lpm_max_queue: int = 128
    disable_radix_cache: bool = False
    num_threads: int | None = None
    init_new_token_ratio: float = 0.7
    min_new_token_ratio: float = 0.1
    new_token_ratio_decay_steps: int = 600
    dedupe_min_shared_tokens: int = 32
    disable_regex_jump_forward: bool = False
    constrained_json_whitespace_pattern: str | None = None
    constrained_json_extra_properties: bool = False
    constraint_compile_timeout: float = 10.0
    constraint_cache_size: int = 64
    load_format: str = "auto"
    disable_cuda_graph: bool = False
    disable_overlap_schedule: bool = False
    enable_mixed_chunk: bool = False
    cuda_graph_max_bs: int = 256
    cuda_graph_max_prefill_tokens: int = 1024
    quantization: str | None = None
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.chunked_prefill_size is None:
            self.chunked_prefill_size = 8192 if str(self.device).startswith("cuda") else 2048
        for name, least in (
            ("max_running_requests", 1),
            ("chunked_prefill_size", 1),
            ("new_token_ratio_decay_steps", 1),
            ("lpm_max_queue", 1),
            ("dedupe_min_shared_tokens", 1),
            ("cuda_graph_max_bs", 1),
            ("cuda_graph_max_prefill_tokens", 0),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                kind = "a positive integer" if least else "an integer >= 0"
                raise ValueError(f"{name} must be {kind}, got {value!r}")
        if self.max_total_tokens is not None and (
            not isinstance(self.max_total_tokens, int)
            or isinstance(self.max_total_tokens, bool)
            or self.max_total_tokens <= 0
        ):
            raise ValueError(
                f"max_total_tokens must be a positive integer, got {self.max_total_tokens!r}"
            )
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError(
                f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static!r}"
            )
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.quantization not in (None, "int4", "int8"):
            raise ValueError(
                f"quantization must be None, 'int4' or 'int8', got {self.quantization!r}"
            )
        if self.quantization is not None and str(self.device).startswith("cuda"):
            raise ValueError(
                f"quantization={self.quantization!r} is a CPU feature for now; "
                f"device={self.device!r} is not supported (leave quantization unset on CUDA)"
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {sorted(KV_CACHE_DTYPES)}, "
                f"got {self.kv_cache_dtype!r}"
            )
        if self.kv_cache_dtype != "auto" and not str(self.device).startswith("cuda"):
            raise ValueError(
                f"kv_cache_dtype={self.kv_cache_dtype!r} needs a CUDA device (the Triton "
                f"attention kernels read it); device={self.device!r} keeps the model's dtype"
            )
        if self.schedule_policy not in ("lpm", "fcfs", "lof"):
            raise ValueError(
                f"schedule_policy must be 'lpm', 'fcfs' or 'lof', got {self.schedule_policy!r}"
            )
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(
                f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}"
            )
        if self.constraint_compile_timeout <= 0 or self.constraint_cache_size <= 0:
            raise ValueError("constraint_compile_timeout and constraint_cache_size must be > 0")
        if self.context_length is not None and self.context_length <= 0:
            raise ValueError(f"context_length must be positive, got {self.context_length!r}")
        if self.num_threads is not None and self.num_threads <= 0:
            raise ValueError(f"num_threads must be positive, got {self.num_threads!r}")
        if not 0.0 <= self.min_new_token_ratio <= self.init_new_token_ratio <= 1.0:
            raise ValueError("need 0 <= min_new_token_ratio <= init_new_token_ratio <= 1")

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> EngineConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(
                f"unknown engine option(s) {unknown}; valid options: {', '.join(sorted(known))}"
            )
        return cls(**kwargs)  # type: ignore[arg-type]
