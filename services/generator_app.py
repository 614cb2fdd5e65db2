"""Ray Serve application: the generator HTTP API (distar.serving) with @serve.batch over concurrent requests.

    serve run deploy/serve_generator.yaml                        # from the repository root
    distar serve --model digits-onestep --reference digits-teacher --port 8000
"""
from __future__ import annotations

from ray import serve
from ray.serve.config import BackpressureConfig

from distar.serving.api import build_api, health_of
from distar.serving.config import GeneratorAppConfig
from distar.serving.service import AsyncGenerator, GeneratorService, Job


@serve.deployment
@serve.ingress()  # the FastAPI app is built on the replica, around this instance (__serve_build_asgi_app__)
class GeneratorDeployment:
    def __init__(self, config: GeneratorAppConfig):
        self.config = config
        self.runner = AsyncGenerator(GeneratorService(config.model, config.device, config.reference,
                                                      config.weights_dir, config.torch_threads))
        self._batched.set_max_batch_size(config.max_batch_size)
        self._batched.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.batch_sizes: list[int] = []  # requests per @serve.batch call, for batch_stats()

    def __serve_build_asgi_app__(self):
        # /health names the model as the operator gave it (models:/NAME@ALIAS), not the replica's cache path
        health = health_of(self.runner.service, self.config.batching, self.config.model, self.config.reference)
        return build_api(self, health)

    async def generate(self, job: Job) -> list[bytes]:
        return await (self._batched(job) if self.config.batching else self.runner.generate(job))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)  # reset from the config in __init__
    async def _batched(self, jobs: list[Job]) -> list[list[bytes]]:
        self.batch_sizes = (self.batch_sizes + [len(jobs)])[-1000:]
        return await self.runner.generate_many(jobs)

    def batch_stats(self) -> dict:
        """Sizes of the last (up to 1000) batches, through a handle: `handle.batch_stats.remote()`."""
        return {"batches": len(self.batch_sizes), "requests": sum(self.batch_sizes),
                "max_batch": max(self.batch_sizes, default=0)}

    async def reference(self, job: Job) -> list[bytes]:
        return await self.runner.reference(job)


def build_app(config: GeneratorAppConfig | dict) -> serve.Application:
    """Application builder: `args:` of a Serve config file arrive as a dict and are validated here."""
    config = config if isinstance(config, GeneratorAppConfig) else GeneratorAppConfig.model_validate(config)
    return GeneratorDeployment.options(
        num_replicas=config.num_replicas, max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=config.retry_after_s),
        graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s, graceful_shutdown_wait_loop_s=0.5,
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
    ).bind(config)
