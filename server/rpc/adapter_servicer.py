"""AdapterService: a few lines per RPC; conversion in convert.py, work in the core."""

from __future__ import annotations

from impasto.core.errors import InvalidArgument
from impasto.core.image_engine import ImageEngine

from . import convert
from .pb import adapter_service_pb2 as pb
from .pb import adapter_service_pb2_grpc as pb_grpc


class AdapterServicer(pb_grpc.AdapterServiceServicer):
    def __init__(self, engine: ImageEngine):
        self.engine = engine

    async def UploadAdapter(self, request_iterator, context):
        stream = aiter(request_iterator)
        first = await anext(stream, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("header", "the first message must carry the header (name, format, model)")
        header = first.header

        async def chunks():
            async for message in stream:
                if message.WhichOneof("part") != "chunk":
                    raise InvalidArgument("header", "only the first message may carry the header")
                yield message.chunk

        record, existed = await self.engine.upload_adapter(
            name=header.name,
            format=convert.adapter_format_hint(header.format),
            model=header.model,
            chunks=chunks(),
            declared_size=header.size_bytes,
        )
        return pb.UploadAdapterResponse(adapter=convert.adapter_info(record), already_existed=existed, warnings=list(record.warnings))

    async def ListAdapters(self, request, context):
        return pb.ListAdaptersResponse(adapters=[convert.adapter_info(r) for r in self.engine.list_adapters()])

    async def DeleteAdapter(self, request, context):
        return pb.DeleteAdapterResponse(adapter=convert.adapter_info(self.engine.delete_adapter(request.adapter)))
