"""The JSON the API takes and gives, validated at the edge; its limits come from the server's
config, so the OpenAPI document states the real ones.

`/api/search` is mmret's own shape (item hits and caption hits in one answer). `/knn-service`
and `/metadata` follow clip-retrieval's back end (see `mmret.serve.knn`): `text`, `image`
(base64), `embedding_input`, `modality` (which index: `image` for items, `text` for captions),
`num_images`, `num_result_ids`, `deduplicate`, `indice_name`, answered by a list of `{id,
similarity, caption, url}` with integer ids; `image_url` is refused, since this server fetches
nothing, and the flags of clip-retrieval's other filters (safety, violence, aesthetics) are
accepted and ignored. mmret adds `id` in the request (more like a gallery item).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

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
    query_run: str | None = Field(None, description="an upload of another kind than the gallery's (a sound for "
                                                    "pictures): the run of the space that embedded it")


class KnnResult(BaseModel):
    """One result as clip-retrieval's back end gives it; past `num_images`, only id and similarity."""

    model_config = ConfigDict(extra="allow")  # the gallery's own id, under its table's name (image_id, audio_id)
    id: int = Field(description="the item's row in the gallery's embeddings (stable while the gallery is)")
    similarity: float = Field(description="cosine similarity to the query")
    caption: str | None = Field(None, description="the item's first caption, or the caption that matched")
    url: str | None = Field(None, description="where the item came from, when known; else this server's /media/ URL")
    thumbnail: str | None = Field(None, description="this server's /thumbnails/ URL")


class MetadataResult(BaseModel):
    id: int
    metadata: dict = Field(description="caption, url, the gallery's id and the item's source fields")


class Health(BaseModel):
    status: Literal["ok"]


class ErrorBody(BaseModel):
    """Every refusal and fault: one line saying why."""

    error: str


ERRORS = {
    400: "malformed request (JSON that does not parse, a picture that is not base64)",
    401: "the API key is missing or wrong",
    403: "refused: a cross-origin request --cors does not allow, or a file that may not be served",
    404: "no such item, index or file",
    413: "too large: the body, the upload or its pixels are over the limits",
    415: "the upload is not an item of the gallery's kind mmret can read",
    422: "the request is outside the limits or not of a shape this route takes",
    503: "busy: too many queries are waiting, or none was answered in time; try again",
    500: "a fault of the server (logged)",
}


def error_responses(cfg: ServeConfig, *statuses: int) -> dict:
    """OpenAPI `responses` for the refusals a route can answer (401 when the server wants a key, and
    500, on every route), each an `ErrorBody`."""
    wanted = sorted(set(statuses) | ({401} if cfg.api_key else set()) | {500})
    return {status: {"model": ErrorBody, "description": ERRORS[status]} for status in wanted}


def exactly_one(*names: str, text_pattern: bool = False) -> dict:
    """The JSON schema's way to say a request gives exactly one of `names` (not null), which the
    server checks itself, so its message says so; with `text_pattern`, a text counts as given only
    when it holds more than spaces (clip-retrieval's clients send "" beside a picture)."""
    def given(name: str) -> dict:
        if text_pattern and name == "text":
            return {"type": "string", "pattern": r"\S"}
        return {"not": {"type": "null"}}

    return {"oneOf": [{"required": [n], "properties": {n: given(n)}} for n in names]}


def _integral(value: object) -> object:
    """JSON Schema's integer holds 3.0 as well as 3; the strict request models refuse other floats,
    `true` and `"3"`, as the schema's types do."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


WholeNumber = Annotated[int, BeforeValidator(_integral)]
# not `WholeNumber | None`: pydantic would leave a field's bounds out of that union's schema
MaybeWholeNumber = Annotated[int | None, BeforeValidator(_integral)]

BASE64 = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"


def _embedding(dim: int | None) -> dict:
    """`dim` numbers, not all zero (a direction); the server says so itself when a request is not."""
    length = {"minItems": dim, "maxItems": dim} if dim else {}
    return {**length, "contains": {"not": {"const": 0}}}


def request_models(cfg: ServeConfig, dim: int | None = None) -> SimpleNamespace:
    """The request bodies, with this server's limits (and `dim`, the size of a query embedding).
    Strict: a number is a JSON number, not `true` or `"3"`, as the schema's types say (`WholeNumber`)."""
    # a query of spaces only is refused as empty: the pattern says so in the schema (validated in `service`)
    text_field = dict(min_length=1, max_length=cfg.max_query_chars, json_schema_extra={"pattern": r"\S"})
    k_field = dict(ge=1, le=cfg.max_k)

    class SearchRequest(BaseModel):
        """Exactly one of `text` and `id`."""

        model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=exactly_one("text", "id"))
        text: str | None = Field(None, description="a caption to search with", **text_field)
        id: str | None = Field(None, description="a gallery item's id: more like it", max_length=4096)
        k: WholeNumber = Field(cfg.k, description="how many results", **k_field)

    knn_field = dict(ge=1, le=cfg.max_knn)

    class KnnRequest(BaseModel):
        """clip-retrieval's request; read as JSON whatever its Content-Type says (its clients send none,
        or text/plain). A text of spaces only (or "") counts as none, as clip_back's does."""

        model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra=exactly_one(
            "text", "image", "embedding_input", "id", text_pattern=True))
        text: str | None = Field(None, description="a caption to search with (\"\" counts as none)",
                                 max_length=cfg.max_query_chars)
        image: str | None = Field(None, description="a picture (any file of the gallery's kind), base64",
                                  json_schema_extra={"pattern": BASE64})
        image_url: str | None = Field(None, description="refused: this server fetches nothing",
                                      json_schema_extra={"not": {"type": "string"}})
        embedding_input: list[float] | None = Field(None, description="a query embedding of the run's size",
                                                    json_schema_extra=_embedding(dim))
        id: str | None = Field(None, description="mmret: a gallery item's id (more like it)", max_length=4096)
        modality: Literal["image", "text"] = Field("image", description="image: search the items; text: the captions")
        num_images: WholeNumber = Field(40, description="results with their caption and url", **knn_field)
        num_result_ids: MaybeWholeNumber = Field(None, description="results in all (default: num_images); those past "
                                                             "num_images come as id and similarity", **knn_field)
        deduplicate: bool = Field(False, description="leave out results within 0.94 cosine of a better one")
        indice_name: str | None = Field(None, description="the gallery's name (see /indices-list)")

    class MetadataRequest(BaseModel):
        model_config = ConfigDict(extra="ignore", strict=True)
        ids: list[WholeNumber] = Field(description="rows of the gallery, as /knn-service gives them",
                                       max_length=cfg.max_knn)
        indice_name: str | None = Field(None, description="the gallery's name (see /indices-list)")

    return SimpleNamespace(SearchRequest=SearchRequest, KnnRequest=KnnRequest, MetadataRequest=MetadataRequest)
