"""gRPC AdapterService (loraplex.v1): protobuf <-> the admin request path (api/admin_path.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from loraplex.v1 import adapters_pb2 as pb
from loraplex.v1 import adapters_pb2_grpc as pb_grpc
from loraplex_server.api.admin_path import AdminPath
from loraplex_server.api.errors import InvalidRequest
from loraplex_server.api.requests import AdapterView, UploadInput
from loraplex_server.frontends.grpc_calls import abort_for, call_of

RESIDENCY = {"device": pb.RESIDENCY_DEVICE, "host": pb.RESIDENCY_HOST, "disk": pb.RESIDENCY_DISK}
MAX_PAGE_BYTES = 1 << 20


def adapter_info(view: AdapterView) -> pb.AdapterInfo:
    manifest = view.manifest
    extra = manifest.extra
    return pb.AdapterInfo(
        name=manifest.name, version=manifest.version, task=extra.get("task", ""), labels=manifest.labels,
        rank=extra.get("rank", 0), target_modules=extra.get("target_modules", []), size_bytes=extra.get("size", 0),
        created=extra.get("created", ""), base_fingerprint=extra.get("base_fingerprint") or "",
        residency=RESIDENCY[view.residency], pinned=view.pinned,
        manifest_json=json.dumps(manifest.to_dict(), sort_keys=True))


def _encoded_size(view: AdapterView) -> int:
    return adapter_info(view).ByteSize() + 6  # the repeated field's tag and length prefix


async def _upload_parts(requests) -> tuple[UploadInput | None, AsyncIterator[bytes] | None]:
    first = await anext(aiter(requests), None)
    if first is None:
        return None, None
    if not first.HasField("metadata"):
        raise InvalidRequest("the first upload message must carry the metadata, then the archive's chunks")
    meta = first.metadata

    async def chunks() -> AsyncIterator[bytes]:
        async for message in requests:
            if not message.HasField("chunk"):
                raise InvalidRequest("metadata may only come once, in the first message")
            yield message.chunk

    return UploadInput(meta.name, meta.size_bytes, meta.sha256, list(meta.labels), meta.base_fingerprint,
                       meta.metrics_json), chunks()


class AdapterAdminService(pb_grpc.AdapterServiceServicer):
    def __init__(self, admin: AdminPath) -> None:
        self.admin = admin

    async def Upload(self, requests, context) -> pb.UploadResponse:
        try:
            view = await self.admin.upload(call_of(context, "Upload"), lambda: _upload_parts(requests))
        except Exception as exc:
            await abort_for(context, exc)
        return pb.UploadResponse(adapter=adapter_info(view))

    async def List(self, request: pb.ListRequest, context) -> pb.ListResponse:
        try:
            page, token = await self.admin.list(call_of(context, "List"), request.page_size, request.page_token,
                                                _encoded_size, MAX_PAGE_BYTES)
        except Exception as exc:
            await abort_for(context, exc)
        return pb.ListResponse(adapters=[adapter_info(view) for view in page], next_page_token=token)

    async def Get(self, request: pb.GetRequest, context) -> pb.GetResponse:
        try:
            view = await self.admin.get(call_of(context, "Get"), request.adapter)
        except Exception as exc:
            await abort_for(context, exc)
        return pb.GetResponse(adapter=adapter_info(view))

    async def Delete(self, request: pb.DeleteRequest, context) -> pb.DeleteResponse:
        try:
            versions = await self.admin.delete(call_of(context, "Delete"), request.adapter)
        except Exception as exc:
            await abort_for(context, exc)
        return pb.DeleteResponse(versions=versions)

    async def Load(self, request: pb.LoadRequest, context) -> pb.LoadResponse:
        try:
            view = await self.admin.load(call_of(context, "Load"), request.adapter, request.pin)
        except Exception as exc:
            await abort_for(context, exc)
        return pb.LoadResponse(adapter=adapter_info(view))

    async def Unload(self, request: pb.UnloadRequest, context) -> pb.UnloadResponse:
        try:
            view = await self.admin.unload(call_of(context, "Unload"), request.adapter)
        except Exception as exc:
            await abort_for(context, exc)
        return pb.UnloadResponse(adapter=adapter_info(view))
