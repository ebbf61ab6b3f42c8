"""ImageService: a few lines per RPC; conversion in convert.py, work in the core."""

from __future__ import annotations

from impasto.core.image_engine import ImageEngine, new_request_id

from . import convert
from .progress_pacing import ProgressPacer
from .pb import image_service_pb2 as pb
from .pb import image_service_pb2_grpc as pb_grpc


class ImageServicer(pb_grpc.ImageServiceServicer):
    def __init__(self, engine: ImageEngine):
        self.engine = engine

    async def Generate(self, request, context):
        spec = convert.generation_spec(request)
        # A client may name the request (x-request-id metadata) to find it in our logs.
        metadata = dict(context.invocation_metadata() or ())
        request_id = str(metadata.get("x-request-id", ""))[:64] or new_request_id()
        pacer = ProgressPacer(request.progress_interval_ms if request.HasField("progress_interval_ms") else None)
        async for event in self.engine.generate(spec, request_id=request_id):
            if pacer.send(event):
                yield convert.generate_response(request_id, event)

    async def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[convert.model_info(m) for m in self.engine.models()])

    async def ListSamplers(self, request, context):
        return pb.ListSamplersResponse(samplers=[convert.sampler_info(s) for s in self.engine.samplers()])

    async def GetServerInfo(self, request, context):
        return convert.server_info(self.engine.server_info())
