"""clip-retrieval's back-end API over the gallery, so its own clients (`ClipClient`, clip-front)
work unchanged:

    POST /knn-service   {text | image | embedding_input (| id), modality, num_images, num_result_ids,
                         deduplicate, indice_name} -> [{id, similarity, caption, url, thumbnail, <gallery id>}]
    POST /metadata      {ids, indice_name} -> [{id, metadata: {caption, url, <gallery id>, source fields}}]
    GET  /indices-list  -> [the gallery's name]

As clip_back does: the body is read as JSON whatever its Content-Type says (ClipClient sends none,
clip-front's fetch text/plain); `text: ""` counts as no text; ids are integers, the item's row in
the gallery's embeddings (stable until the gallery changes), with mmret's own id beside them
under the table's name (`image_id`); `num_result_ids` results come back, the first `num_images`
with their caption and url (clip-front fetches the rest from /metadata); `deduplicate` leaves out
results within 0.94 cosine of a better-ranked one, transitively; repeated items (several captions
of one item, for modality text) come once. A `url` is the item's source URL when the dataset kept
one (img2dataset's `url`), else this server's absolute /media/ URL. The filters clip-retrieval
runs its own models for (safety, violence, aesthetics, mclip) are accepted and ignored.
"""

# no `from __future__ import annotations`: FastAPI reads the request models from the annotations
import base64
import binascii
import json
from typing import Any
from urllib.parse import quote

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from mmret.inference.search import Hit, near_duplicates
from mmret.serve.schemas import KnnResult, MetadataResult, error_responses
from mmret.serve.service import Answer, ApiError, SearchService

DEDUPLICATE = 0.94  # clip_back's cosine threshold for "the same picture"


async def json_body(request: Request, model: type[BaseModel]) -> Any:
    """The body parsed as JSON (any Content-Type) and validated against `model`; errors answer as
    FastAPI's own do (400 malformed JSON, 422 a field's one line)."""
    raw = await request.body()
    try:
        data = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON: {e}") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from None


def _body_schema(model: type[BaseModel]) -> dict:
    """The request body as OpenAPI states it (the route reads it itself, so FastAPI cannot)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def add_knn_routes(app: Any, service: SearchService, models: Any, keyed: list) -> None:
    gallery, cfg = service.gallery, service.cfg

    @app.post("/knn-service", response_model=list[KnnResult], response_model_exclude_none=True, dependencies=keyed,
              tags=["clip-retrieval"], openapi_extra=_body_schema(models.KnnRequest),
              responses=error_responses(cfg, 400, 403, 404, 413, 415, 422, 503))
    async def knn_service(request: Request) -> list[dict]:
        """clip-retrieval's `/knn-service`: the nearest items (modality image) or captions (text)."""
        body = await json_body(request, models.KnnRequest)
        wanted = max(body.num_images, body.num_result_ids or body.num_images)
        answer = await _knn(service, body, wanted)
        hits = answer.captions if body.modality == "text" else answer.items
        hits = _once(hits)
        if body.deduplicate and hits:
            vectors = (gallery.emb.captions[[h.caption_row for h in hits]] if body.modality == "text"
                       else gallery.emb.items[[h.row for h in hits]])
            dropped = near_duplicates(vectors, DEDUPLICATE)
            hits = [h for i, h in enumerate(hits) if i not in dropped]
        base = str(request.base_url).rstrip("/")
        return [_result(h, base, described=n < body.num_images) for n, h in enumerate(hits[:wanted])]

    @app.post("/metadata", response_model=list[MetadataResult], dependencies=keyed, tags=["clip-retrieval"],
              openapi_extra=_body_schema(models.MetadataRequest), responses=error_responses(cfg, 400, 403, 404, 422))
    async def metadata(request: Request) -> list[dict]:
        """clip-retrieval's `/metadata`: caption, url and source fields of gallery rows (the ids /knn-service gave)."""
        body = await json_body(request, models.MetadataRequest)
        _check_index(service, body.indice_name)
        bad = [i for i in body.ids if not 0 <= i < gallery.n_items]
        if bad:
            raise ApiError(404, f"no row {bad[0]} in the gallery: ids are rows 0 to {gallery.n_items - 1}")
        base = str(request.base_url).rstrip("/")
        return [{"id": i, "metadata": {**gallery.source(i), **_described(i, base)}} for i in body.ids]

    @app.get("/indices-list", dependencies=keyed, tags=["clip-retrieval"], responses=error_responses(cfg))
    async def indices_list() -> list[str]:
        """clip-retrieval's list of indices: the one gallery this server holds."""
        return [gallery.dataset]

    def _described(row: int, base: str, caption: str | None = None) -> dict:
        quoted = quote(gallery.ids[row], safe="")
        captions = gallery.captions_of[row]
        return {"caption": caption or (captions[0] if captions else None),
                "url": gallery.urls[row] or f"{base}/media/{quoted}", "thumbnail": f"{base}/thumbnails/{quoted}",
                service.modality.id_column: gallery.ids[row]}

    def _result(hit: Hit, base: str, described: bool) -> dict:
        out = {"id": hit.row, "similarity": hit.score}
        caption = hit.captions[0] if hit.caption_row >= 0 else None  # a caption hit: the caption that matched
        return {**out, **_described(hit.row, base, caption)} if described else out


def _once(hits: list[Hit]) -> list[Hit]:
    """Each item once, at its best rank (several of its captions may match)."""
    seen: set[int] = set()
    return [h for h in hits if not (h.row in seen or seen.add(h.row))]


def _check_index(service: SearchService, name: str | None) -> None:
    if name not in (None, "", service.gallery.dataset):
        raise ApiError(404, f"no index {name[:100]!r}; this server has {service.gallery.dataset!r}")


async def _knn(service: SearchService, body: Any, k: int) -> Answer:
    text = body.text if body.text and body.text.strip() else None  # clip_back treats "" as no text
    given = [name for name, value in (("text", text), ("image", body.image), ("image_url", body.image_url),
                                      ("embedding_input", body.embedding_input), ("id", body.id)) if value is not None]
    if len(given) != 1:
        raise ApiError(422, "give exactly one of text, image, embedding_input and id")
    _check_index(service, body.indice_name)
    if text is not None:
        return await service.text(text, k, captions=body.modality == "text")
    if body.id is not None:
        return await service.similar(body.id, k)
    if body.embedding_input is not None:
        return await service.vector(body.embedding_input, k)
    if body.image_url is not None:
        raise ApiError(422, "image_url is not supported: this server fetches nothing; send the picture in image "
                            "(base64)")
    try:
        data = base64.b64decode(body.image, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image must be base64") from None
    if len(data) > service.cfg.max_upload_bytes:
        raise ApiError(413, f"the picture is over the limit of {service.cfg.max_upload_bytes:,} bytes")
    path = await run_in_threadpool(service.save_upload, [data], "")
    try:
        return await service.upload(path, k)
    finally:
        path.unlink(missing_ok=True)
