"""The one config object of a generator server (Serve application args, or `distar serve` flags)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class GeneratorAppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field("digits-onestep", description="digits-onestep | checkpoint dir | models:/NAME@ALIAS")
    reference: str | None = Field(None, description="multi-step reference shown beside it, e.g. digits-teacher")
    weights_dir: str | None = Field(None, description="digits weights directory (default: the shipped ones)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int | None = Field(1, ge=1, description="intra-op threads per replica (None: torch's default)")
    batching: bool = True
    # On a CPU one network call takes 16 rows (loading.NET_BATCH, padded: the bytes-equal-`distar generate`
    # promise), so 16 one-image requests cost what one does; waiting up to 50 ms to fill a batch measured 6x
    # the throughput of a 10 ms wait at 32 clients on a loaded 2-core box (jobs/bench_serving.py), for ~50 ms
    # more latency when idle. On a GPU calls are not padded (up to 16 rows each, half precision).
    max_batch_size: int = Field(16, ge=1, le=256, description="requests per @serve.batch call")
    batch_wait_timeout_s: float = Field(0.05, ge=0.0, le=1.0)
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.25, ge=0.0, description="CPUs reserved per replica (0.25 on a shared 2-core box)")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per replica (fractions share a GPU)")
    max_ongoing_requests: int = Field(64, ge=1, description="per replica; must exceed max_batch_size to fill batches")
    # Overload: past max_ongoing_requests per replica, up to max_queued_requests wait at the proxy; the next
    # ones get 503 with Retry-After at once (Serve's backpressure_config), not an ever-longer wait.
    max_queued_requests: int = Field(128, ge=1, description="requests waiting at the proxy beyond those in flight")
    retry_after_s: int = Field(1, ge=0, description="Retry-After (seconds) of the 503 sent past the queue bound")
    graceful_shutdown_timeout_s: float = Field(10.0, ge=0.0, description="on stop, longest wait for requests in flight")
