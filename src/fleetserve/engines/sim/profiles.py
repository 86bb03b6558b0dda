"""Named latency profiles of the SIMULATED engine: one vLLM replica of an 8B model on one GPU.

Nothing here runs a model. Each profile turns published hardware figures into the handful of
numbers the simulated scheduler needs, with a roofline argument small enough to check by hand:

* decode step (weights read once per forward pass; memory-bound)::

      decode_base_s    = weight_bytes / (bandwidth * BANDWIDTH_EFFICIENCY)
      decode_per_seq_s = (mean-context KV bytes) / (bandwidth * BANDWIDTH_EFFICIENCY)
                         + 2 * params / (dense_fp16_flops * PREFILL_MFU)

  so one step of a batch of b sequences takes ``decode_base_s + decode_per_seq_s * b``.
* prefill (compute-bound): ``prefill_tokens_per_s = dense_fp16_flops * PREFILL_MFU / (2*params)``.
* KV capacity: what vLLM keeps after weights and activations,
  ``(memory * 0.9 - weight_bytes - overhead) / kv_bytes_per_token`` (0.9 is vLLM's default
  ``--gpu-memory-utilization``), rounded down to whole 16-token blocks.
* ``max_num_seqs`` and ``max_num_batched_tokens`` are vLLM's own defaults for the OpenAI server:
  256 / 2048 on GPUs under 70 GiB, 1024 / 8192 on larger ones other than A100
  (``EngineArgs.get_batch_defaults`` in vllm/engine/arg_utils.py).

Resulting numbers (Llama-3.1-8B-Instruct, BF16, vLLM defaults)::

    profile   base step   + per seq   step, 1 seq   prefill tok/s   KV tokens   max seqs   cold
    a10g      34.8 ms     0.75 ms     35.5 ms        2,180           25,872     256        45 s
    l4        69.5 ms     0.85 ms     70.4 ms        3,770           25,872     256        50 s
    h100       6.2 ms     0.085 ms     6.3 ms       30,800          434,512     1024       35 s
    instant    0          0           0             (no sleeps)    1,048,576    1024        0 s

Cross-check: the same formulas for an A100-40GB (1,555 GB/s, 312 TFLOPS) give 13.6 ms per
token for a request alone (73 tok/s) and 7.2x that throughput at 8 concurrent requests; John
Musgrave's published vLLM sweep of Llama-3.1-8B-Instruct on that GPU measured 75 tok/s and
6.6x (https://johnmusgrave.com/p/vllm-throughput-latency-sweep-on).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from types import MappingProxyType

from fleetserve.errors import ConfigError

GIB = 2**30

# Decode reaches 77% of the memory-bandwidth roofline: Musgrave measured 75 tok/s single-stream
# for Llama-3.1-8B BF16 under vLLM on an A100-40GB, whose roofline is 1,555 GB/s / 16.06 GB.
BANDWIDTH_EFFICIENCY = 0.77
# Prefill runs at half the dense tensor peak: an assumption (typical model-FLOPs utilisation of
# large GEMMs), applied to the usual 2 * params FLOPs per token
# (https://fergusfinn.com/blog/inference-arithmetic).
PREFILL_MFU = 0.5
# Context length assumed for the KV read of each extra sequence in a decode step.
MEAN_CONTEXT_TOKENS = 1024
# vLLM's default --gpu-memory-utilization.
GPU_MEMORY_UTILIZATION = 0.9
# vLLM's default KV block size on CUDA (tokens per block); prefix caching hashes whole blocks.
BLOCK_SIZE = 16


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The model a profile serves; only its size matters to the latency model."""

    name: str
    params: float
    weight_bytes: float
    kv_bytes_per_token: int


# Llama-3.1-8B: 8.03e9 parameters, BF16 -> 16.06 GB of weights. KV cache per token:
# 2 (K and V) * 32 layers * 8 KV heads * 128 head dim * 2 bytes = 131,072 B = 128 KiB.
LLAMA_31_8B = ModelShape(
    name="Llama-3.1-8B-Instruct (BF16)",
    params=8.03e9,
    weight_bytes=16.06e9,
    kv_bytes_per_token=2 * 32 * 8 * 128 * 2,
)


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """Vendor figures for one GPU, with where they come from."""

    name: str
    memory_bytes: float
    bandwidth_bytes_s: float
    dense_fp16_flops: float
    # vLLM's activation peak (profile run at max_num_batched_tokens), CUDA graphs and the CUDA
    # context: an estimate of what vLLM reserves besides weights and KV cache.
    overhead_bytes: float
    source: str


A10G = GpuSpec(
    name="NVIDIA A10G (AWS g5)",
    memory_bytes=24e9,
    bandwidth_bytes_s=600e9,
    dense_fp16_flops=70e12,
    overhead_bytes=2 * GIB,
    source=(
        "24 GB GDDR6 at 600 GB/s, 70 TFLOPS dense FP16 tensor: Baseten, 'NVIDIA A10 vs A10G "
        "for ML model inference' (https://www.baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-"
        "inference/)"
    ),
)
L4 = GpuSpec(
    name="NVIDIA L4",
    memory_bytes=24e9,
    bandwidth_bytes_s=300e9,
    dense_fp16_flops=121e12,
    overhead_bytes=2 * GIB,
    source=(
        "24 GB GDDR6 at 300 GB/s, 242 TFLOPS FP16 tensor with sparsity = 121 dense: NVIDIA L4 "
        "datasheet, as summarised at https://grokipedia.com/page/NVIDIA_L4_vs_L40S"
    ),
)
H100_SXM = GpuSpec(
    name="NVIDIA H100 SXM5 80GB",
    memory_bytes=80 * GIB,
    bandwidth_bytes_s=3350e9,
    dense_fp16_flops=989e12,
    # max_num_batched_tokens is 8192 here (vs 2048), so the activation peak is larger.
    overhead_bytes=4 * GIB,
    source=(
        "80 GB HBM3 at 3.35 TB/s, 989 TFLOPS dense BF16: NVIDIA H100 datasheet, as tabulated at "
        "https://glennklockwood.com/garden/processors/h100"
    ),
)


@dataclass(frozen=True, slots=True)
class SimProfile:
    """The numbers the simulated scheduler runs on. Times in seconds, sizes in tokens."""

    name: str
    description: str
    decode_base_s: float
    decode_per_seq_s: float
    prefill_tokens_per_s: float
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_capacity_tokens: int
    max_model_len: int
    cold_start_s: float
    block_size: int = BLOCK_SIZE
    prefix_caching: bool = True
    # Answer at once, without the step loop or any sleep (gateway overhead benchmarks).
    instant: bool = False

    @property
    def kv_blocks(self) -> int:
        return self.kv_capacity_tokens // self.block_size

    def decode_step_s(self, batch: int) -> float:
        """One forward pass that samples a token for each of `batch` sequences."""
        return self.decode_base_s + self.decode_per_seq_s * batch

    def prefill_s(self, tokens: int) -> float:
        return 0.0 if self.instant else tokens / self.prefill_tokens_per_s

    def single_request_s(self, prompt_tokens: int, output_tokens: int, cached: int = 0) -> float:
        """End-to-end time of a request alone on the engine: prefill + one step per token.

        A prompt longer than the step token budget is prefilled in chunks, each chunk but the
        last being a forward pass of its own (vLLM's chunked prefill).
        """
        if self.instant:
            return 0.0
        to_compute = prompt_tokens - cached
        chunks = max(1, math.ceil(to_compute / self.max_num_batched_tokens))
        return (
            self.prefill_s(to_compute)
            + (chunks - 1) * self.decode_base_s
            + output_tokens * self.decode_step_s(1)
        )

    def with_overrides(
        self,
        *,
        cold_start_s: float | None = None,
        max_num_seqs: int | None = None,
        kv_capacity_tokens: int | None = None,
    ) -> SimProfile:
        """The same hardware model with operator overrides (CLI flags); None keeps a value."""
        return dataclasses.replace(
            self,
            cold_start_s=self.cold_start_s if cold_start_s is None else cold_start_s,
            max_num_seqs=self.max_num_seqs if max_num_seqs is None else max_num_seqs,
            kv_capacity_tokens=(
                self.kv_capacity_tokens if kv_capacity_tokens is None else kv_capacity_tokens
            ),
        )


def derive_profile(
    name: str,
    gpu: GpuSpec,
    *,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    max_model_len: int,
    cold_start_s: float,
    model: ModelShape = LLAMA_31_8B,
) -> SimProfile:
    """Apply the roofline formulas of this module's docstring to one GPU and model."""
    effective_bw = gpu.bandwidth_bytes_s * BANDWIDTH_EFFICIENCY
    effective_flops = gpu.dense_fp16_flops * PREFILL_MFU
    flops_per_token = 2 * model.params
    kv_bytes = gpu.memory_bytes * GPU_MEMORY_UTILIZATION - model.weight_bytes - gpu.overhead_bytes
    kv_tokens = int(kv_bytes // model.kv_bytes_per_token) // BLOCK_SIZE * BLOCK_SIZE
    return SimProfile(
        name=name,
        description=f"SIMULATED vLLM: {model.name} on one {gpu.name}. {gpu.source}.",
        decode_base_s=model.weight_bytes / effective_bw,
        decode_per_seq_s=(
            MEAN_CONTEXT_TOKENS * model.kv_bytes_per_token / effective_bw
            + flops_per_token / effective_flops
        ),
        prefill_tokens_per_s=effective_flops / flops_per_token,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        kv_capacity_tokens=kv_tokens,
        max_model_len=max_model_len,
        cold_start_s=cold_start_s,
    )


# Cold starts are estimates, not measurements: loading 16 GB of safetensors at ~2 GB/s (~8 s)
# plus vLLM V1's torch.compile and CUDA-graph capture (tens of seconds in its start-up logs).
# max_model_len: 8192 on the 24 GB cards, whose ~26k-token KV cache cannot hold the model's
# 131,072-token context (vLLM refuses to start without a smaller --max-model-len); the full
# context on the H100.
PROFILES: MappingProxyType[str, SimProfile] = MappingProxyType(
    {
        "a10g": derive_profile(
            "a10g",
            A10G,
            max_num_seqs=256,
            max_num_batched_tokens=2048,
            max_model_len=8192,
            cold_start_s=45.0,
        ),
        "l4": derive_profile(
            "l4",
            L4,
            max_num_seqs=256,
            max_num_batched_tokens=2048,
            max_model_len=8192,
            cold_start_s=50.0,
        ),
        "h100": derive_profile(
            "h100",
            H100_SXM,
            max_num_seqs=1024,
            max_num_batched_tokens=8192,
            max_model_len=131072,
            cold_start_s=35.0,
        ),
        "instant": SimProfile(
            name="instant",
            description=(
                "SIMULATED engine with no latency at all: every request is answered at once, "
                "for measuring gateway overhead against a direct baseline."
            ),
            decode_base_s=0.0,
            decode_per_seq_s=0.0,
            prefill_tokens_per_s=math.inf,
            max_num_seqs=1024,
            max_num_batched_tokens=1 << 20,
            kv_capacity_tokens=1 << 20,
            max_model_len=131072,
            cold_start_s=0.0,
            instant=True,
        ),
    }
)


def get_profile(name: str) -> SimProfile:
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise ConfigError(f"unknown sim profile {name!r}; choose one of: {known}") from None
