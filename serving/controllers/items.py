"""Catalogue over HTTP: `PUT /v1/items` (attribute updates such as stock and price)
and `GET /v1/items/{item_id}/similar` (item neighbours).

Where an update goes, and why, is in `serving.catalog`: Delta history first, then the
online store, then this process's memory; the other API processes pick it up on
their refresh loop. Both writes are durable before the 200.
"""

import logging
import secrets
from datetime import UTC, datetime
from typing import Annotated, Any

from litestar import Controller, Response, get, put
from litestar.exceptions import (
    NotFoundException,
    ServiceUnavailableException,
)
from litestar.openapi import ResponseSpec
from litestar.params import Body, Parameter

from nextbest.decide.catalog import validate_item_updates
from nextbest.decide.similar import keep_passing, similar_in_model
from nextbest.ingest.limits import LimitExceeded, Limits
from serving import examples
from serving.controllers.common import AUTH_AND_UNAVAILABLE, BODY_REFUSED, SECURITY
from serving.door import unprocessable
from serving.runtime import ServingRuntime
from serving.schemas import (
    ErrorOut,
    ItemsIn,
    ItemsOut,
    RejectedItemOut,
    SimilarItemOut,
    SimilarOut,
)
from storage.delta.item_updates import append_item_updates
from storage.delta.store import DeltaStore

log = logging.getLogger(__name__)
ItemId = Annotated[str, Parameter(min_length=1, max_length=256, description="Item id")]
Neighbours = Annotated[int, Parameter(ge=1, le=100, description="How many neighbours")]
LANCE_OVERFETCH = 4
"""Neighbours asked of LanceDB per one returned, since the catalogue rules filter after."""


def _similar_out(
    runtime: ServingRuntime, item_id: str, source: Any, hits: list[tuple[str, float]]
) -> SimilarOut:
    catalog = runtime.assets.attributes
    items = []
    for item, score in hits:
        attrs = catalog.get(item) or {}
        title = attrs.get("title")
        items.append(
            SimilarItemOut(item, round(score, 6), title if isinstance(title, str) else None, attrs)
        )
    model = runtime.assets.model
    version = model.version if model is not None and source == "model" else None
    return SimilarOut(item_id, source, version, items)


class ItemsController(Controller):
    path = "/v1/items"
    tags = ["items"]
    security = SECURITY

    @put(
        "/",
        operation_id="upsertItems",
        summary="Update item attributes (stock, price, ...)",
        description=(
            "Each item names its `item_id` and some of the spec's item attributes; "
            "attributes not named keep their value, `null` clears one. Items are "
            "validated on their own: invalid ones come back with their index and reason, "
            "valid ones are applied. They are recorded in Delta `item_updates` and the "
            "online store before the 200, and the next decision of every API process "
            "honours them within seconds (e.g. an item out of stock is no longer "
            "recommended when the spec has an `item.in_stock` rule). 422 when no item is "
            "valid; 503 when a store refused the update (retry: applying it twice is "
            "harmless)."
        ),
        status_code=200,
        sync_to_thread=True,
        opt={"scope": "ingest"},
        raises=AUTH_AND_UNAVAILABLE,
        responses={
            200: ResponseSpec(ItemsOut, description="Applied", examples=examples.ITEMS_OUT),
            **BODY_REFUSED,
            422: ResponseSpec(
                ItemsOut, description="No item was valid", examples=examples.ITEMS_NONE
            ),
        },
    )
    def upsert(
        self,
        data: Annotated[ItemsIn, Body(examples=examples.ITEMS_IN)],
        runtime: ServingRuntime,
        limits: Limits,
    ) -> Response[ItemsOut]:
        accepted, rejections = validate_item_updates(data.items, runtime.spec, limits)
        rejected = [RejectedItemOut(r.index, r.reason, r.item_id) for r in rejections]
        if not accepted:
            return Response(ItemsOut(0, rejected), status_code=422)
        update_id = secrets.token_hex(16)
        try:
            append_item_updates(
                DeltaStore.from_settings(runtime.settings),
                accepted,
                update_id=update_id,
                ts=datetime.now(UTC),
            )
        except Exception as exc:
            log.warning("item_updates append failed: %r", exc)
            raise ServiceUnavailableException(
                f"the item history did not accept the update ({type(exc).__name__}); retry"
            ) from exc
        try:
            version = runtime.items.store.upsert(accepted, update_id=update_id)
        except Exception as exc:
            log.warning("item attribute write failed: %r", exc)
            raise ServiceUnavailableException(
                f"the online store did not accept the update ({type(exc).__name__}); retry"
            ) from exc
        try:
            runtime.refresh_items()  # this process at once; the others on their refresh
        except Exception:
            log.exception("applying item updates in memory failed; the refresh loop retries")
        return Response(ItemsOut(len(accepted), rejected, update_id, version), status_code=200)

    @get(
        "/{item_id:str}/similar",
        operation_id="getSimilarItems",
        summary="Items similar to an item (neighbours)",
        description=(
            "The k nearest items by cosine similarity of item vectors: the promoted "
            "model's, else LanceDB's `items` table. The item itself is excluded, and so "
            "is every item the spec's item rules would never show (e.g. out of stock, as "
            "updated by PUT /v1/items). 404 when no vector is known for the item."
        ),
        sync_to_thread=True,
        opt={"scope": "decide"},
        raises=AUTH_AND_UNAVAILABLE,
        responses={
            200: ResponseSpec(SimilarOut, description="Neighbours", examples=examples.SIMILAR_OUT),
            404: ResponseSpec(
                ErrorOut,
                description="No vector for this item",
                examples=examples.UNKNOWN_ITEM,
                generate_examples=False,
            ),
            422: ResponseSpec(
                ErrorOut,
                description="item_id: too long or a control character",
                generate_examples=False,
            ),
        },
    )
    def similar(
        self, item_id: ItemId, runtime: ServingRuntime, limits: Limits, k: Neighbours = 10
    ) -> SimilarOut:
        try:
            limits.check_id("item_id", item_id)
        except LimitExceeded as exc:
            raise unprocessable(exc) from None
        assets = runtime.assets
        hits = similar_in_model(assets, runtime.spec, item_id, k=k)
        if hits is not None:
            return _similar_out(runtime, item_id, "model", hits)
        vectors = runtime.vectors
        found: list[dict[str, Any]] | None = None
        if vectors is not None:
            try:
                found = vectors.similar_items(item_id, k=k * LANCE_OVERFETCH)
            except LookupError:  # no items table yet: no vectors at all
                found = None
            except Exception as exc:
                raise ServiceUnavailableException(
                    f"the vector store failed ({type(exc).__name__}); retry"
                ) from exc
        if found is None:
            raise NotFoundException(f"unknown item {item_id[:64]!r}: no vector for it")
        pairs = [(str(r["item_id"]), float(r["score"])) for r in found]
        kept = keep_passing(runtime.spec, assets.attributes, pairs, item_id=item_id, k=k)
        return _similar_out(runtime, item_id, "vectors", kept)
