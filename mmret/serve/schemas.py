"""The JSON the API takes and gives, validated at the edge; its limits come from the server's
config, so the OpenAPI document states the real ones.

`/api/search` is mmret's own shape (item hits and caption hits in one answer). `/knn-service`
follows clip-retrieval's back end: `text`, `image` (base64), `embedding_input`, `modality`
(which index: `image` for items, `text` for captions), `num_images`, `indice_name`, answered by
a list of `{id, similarity, caption, url}`; `image_url` is refused, since this server fetches
nothing, and the flags of clip-retrieval's filters (safety, deduplication, ...) are accepted and
ignored. mmret adds `id` (more like a gallery item).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mmret.serve.config import ServeConfig


class ItemHit(BaseModel):
    rank: int
    id: str = Field(description="the gallery item's id")
    score: float = Field(description="cosine similarity to the query")
    captions: list[str] = Field(description="the item's captions (none in a gallery without captions)")
    url: str = Field(description="the item's file")
    thumbnail: str = Field(description="a small JPEG of the item")


class CaptionHit(BaseModel):
    rank: int
    caption: str
    score: float
    id: str = Field(description="the item the caption belongs to")
    url: str
    thumbnail: str


class Query(BaseModel):
    kind: Literal["text", "id", "upload"]
    value: str


class SearchResponse(BaseModel):
    query: Query
    modality: str = Field(description="what the gallery's items are (image, ...)")
    k: int
    results: list[ItemHit] = Field(description="the best-matching items, best first")
    captions: list[CaptionHit] = Field(description="for item queries: the captions that fit it best")
    ms: float = Field(description="time spent on the query in the server")


class KnnResult(BaseModel):
    id: str
    similarity: float
    caption: str | None = None
    url: str
    thumbnail: str


class Health(BaseModel):
    status: Literal["ok"]


def request_models(cfg: ServeConfig) -> SimpleNamespace:
    """The request bodies, with this server's limits."""
    text_field = dict(min_length=1, max_length=cfg.max_query_chars)
    k_field = dict(ge=1, le=cfg.max_k)

    class SearchRequest(BaseModel):
        """Exactly one of `text` and `id`."""

        model_config = ConfigDict(extra="forbid")
        text: str | None = Field(None, description="a caption to search with", **text_field)
        id: str | None = Field(None, description="a gallery item's id: more like it", max_length=4096)
        k: int = Field(cfg.k, description="how many results", **k_field)

    class KnnRequest(BaseModel):
        model_config = ConfigDict(extra="ignore")
        text: str | None = Field(None, **text_field)
        image: str | None = Field(None, description="a picture (any file of the gallery's kind), base64")
        image_url: str | None = Field(None, description="refused: this server fetches nothing")
        embedding_input: list[float] | None = Field(None, description="a query embedding of the run's size")
        id: str | None = Field(None, description="mmret: a gallery item's id (more like it)", max_length=4096)
        modality: Literal["image", "text"] = Field("image", description="image: search the items; text: the captions")
        num_images: int = Field(40, **k_field)
        num_result_ids: int | None = Field(None, description="accepted and ignored")
        indice_name: str | None = Field(None, description="the gallery's name (see /indices-list)")

    return SimpleNamespace(SearchRequest=SearchRequest, KnnRequest=KnnRequest)
