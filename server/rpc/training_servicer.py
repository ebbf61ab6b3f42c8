"""TrainingService: a few lines per RPC; conversion in training_convert.py, work in the core."""

from __future__ import annotations

import asyncio

from impasto.core.errors import InvalidArgument
from impasto.core.training_jobs import TrainingJobs

from . import training_convert as convert
from .pb import training_service_pb2 as pb
from .pb import training_service_pb2_grpc as pb_grpc

DOWNLOAD_CHUNK_BYTES = 1024 * 1024


class TrainingServicer(pb_grpc.TrainingServiceServicer):
    def __init__(self, jobs: TrainingJobs):
        self.jobs = jobs

    async def UploadDataset(self, request_iterator, context):
        stream = aiter(request_iterator)
        first = await anext(stream, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("header", "the first message must carry the header (dataset name)")

        async def files():
            async for message in stream:
                if message.WhichOneof("part") != "file":
                    raise InvalidArgument("header", "only the first message may carry the header")
                yield message.file.path, message.file.data

        count, size = await self.jobs.datasets.upload(first.header.name, files())
        return pb.UploadDatasetResponse(name=first.header.name, num_files=count, size_bytes=size)

    async def StartTraining(self, request, context):
        spec = convert.training_spec(request)
        # Resolving the model may read its files (hashing): off the event loop.
        job, position = await asyncio.get_running_loop().run_in_executor(None, self.jobs.submit, spec)
        return pb.StartTrainingResponse(job_id=job.job_id, queue_position=position)

    async def WatchJob(self, request, context):
        async for event in self.jobs.watch(request.job_id):
            yield convert.watch_response(request.job_id, event)

    async def CancelJob(self, request, context):
        return pb.CancelJobResponse(job=convert.job_info(self.jobs.cancel(request.job_id)))

    async def GetJob(self, request, context):
        return pb.GetJobResponse(job=convert.job_info(self.jobs.get(request.job_id)))

    async def ListJobs(self, request, context):
        return pb.ListJobsResponse(jobs=[convert.job_info(j) for j in self.jobs.list()])

    async def DownloadJobOutput(self, request, context):
        path = self.jobs.output_file(request.job_id, request.output)
        data = await asyncio.get_running_loop().run_in_executor(None, path.read_bytes)
        for i in range(0, max(len(data), 1), DOWNLOAD_CHUNK_BYTES):
            yield pb.DownloadJobOutputResponse(file_name=path.name if i == 0 else "", chunk=data[i : i + DOWNLOAD_CHUNK_BYTES])
