"""Build and run the grpc.aio server: ImageService, standard health checking and reflection."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from impasto.config import ServerConfig
from impasto.core.image_engine import ImageEngine
from impasto.core.training_jobs import TrainingJobs

from .adapter_servicer import AdapterServicer
from .errors_interceptor import ErrorsInterceptor
from .image_servicer import ImageServicer
from .pb import adapter_service_pb2 as adapter_pb
from .pb import adapter_service_pb2_grpc as adapter_pb_grpc
from .pb import image_service_pb2 as pb
from .pb import image_service_pb2_grpc as pb_grpc
from .pb import training_service_pb2 as training_pb
from .pb import training_service_pb2_grpc as training_pb_grpc
from .training_servicer import TrainingServicer

log = logging.getLogger(__name__)

IMAGE_SERVICE = pb.DESCRIPTOR.services_by_name["ImageService"].full_name
ADAPTER_SERVICE = adapter_pb.DESCRIPTOR.services_by_name["AdapterService"].full_name
TRAINING_SERVICE = training_pb.DESCRIPTOR.services_by_name["TrainingService"].full_name
SERVICES = (IMAGE_SERVICE, ADAPTER_SERVICE, TRAINING_SERVICE)


class ImpastoServer:
    """A running server: `await start()`, then `await stop()`. `port` is the bound port."""

    def __init__(self, config: ServerConfig, engine: ImageEngine | None = None):
        self.config = config
        self.engine = engine or ImageEngine(config)
        options = [
            ("grpc.max_send_message_length", config.limits.max_message_bytes),
            ("grpc.max_receive_message_length", config.limits.max_message_bytes),
        ]
        self.server = grpc.aio.server(interceptors=[ErrorsInterceptor()], options=options)
        pb_grpc.add_ImageServiceServicer_to_server(ImageServicer(self.engine), self.server)
        adapter_pb_grpc.add_AdapterServiceServicer_to_server(AdapterServicer(self.engine), self.server)
        self.training = TrainingJobs(config, self.engine)
        training_pb_grpc.add_TrainingServiceServicer_to_server(TrainingServicer(self.training), self.server)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port = self.server.add_insecure_port(f"{config.host}:{config.port}")
        if self.port == 0:
            raise OSError(f"cannot bind {config.host}:{config.port}")
        self.metrics_port: int | None = None

    async def start(self) -> None:
        # Load the default model before saying SERVING, so the first request is not slow.
        self.engine.start(preload_default=True)
        # After the engine: a resumed DreamBooth job may ask the step loop for class images.
        self.training.start(asyncio.get_running_loop())
        await self.server.start()
        if self.config.metrics_port is not None:
            self.metrics_port = self.engine.metrics.serve(self.config.metrics_port, self.config.host)
            log.info("metrics on http://%s:%d/metrics", self.config.host, self.metrics_port)
        for service in ("", *SERVICES):
            await _set_status(self.health, service, health_pb2.HealthCheckResponse.SERVING)
        log.info("impasto serving on %s:%d", self.config.host, self.port)

    async def stop(self, grace: float = 5.0) -> None:
        for service in ("", *SERVICES):
            await _set_status(self.health, service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        # Jobs stop at their next step and stay resumable; the engine stops after them.
        await asyncio.get_running_loop().run_in_executor(None, self.training.stop)
        self.engine.stop()
        self.engine.metrics.close()

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def _set_status(servicer, service: str, status) -> None:
    result = servicer.set(service, status)
    if hasattr(result, "__await__"):
        await result
