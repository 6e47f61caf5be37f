"""The HTTP API's JSON shapes (they also make the OpenAPI page at ``/docs``)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ClassScore(BaseModel):
    index: int = Field(description="position in the hierarchy's order (fine index for a subclass)")
    id: str = Field(description="class id, e.g. an ImageNet wnid")
    name: str
    probability: float


class Scored(BaseModel):
    id: str
    name: str
    probability: float


class Prediction(BaseModel):
    superclass: ClassScore
    subclass: ClassScore
    top_k: list[Scored] = Field(description="most probable subclasses, most probable first")
    routing: str = Field(description="the routing that produced the answer (e.g. soft:2@0.7+0.25), or vanilla")
    timing_ms: dict[str, float] = Field(
        description="per stage, measured in the replicas: decode (this image), model (fused two-stage graph), "
        "generalist and specialist (per-stage graph) or network (single-network app) for the request's images, "
        "total (whole request inside the ingress)"
    )


class Predictions(BaseModel):
    predictions: list[Prediction]


class Health(BaseModel):
    status: str
    app: str
    bundle: str
    resident: str
    stage_one: str = Field(description="what names the superclass: vanilla (the resident's forward), generalist or "
                           "trunk_router (a head on the resident's trunk)")
    routing: str | None = Field(description="the routing answers use unless a request asks for another")
    routings: dict[str, str] = Field(description="the routings the bundle stores, by name")
    superclasses: int
    subclasses: int
    image_size: int
    resident_bytes: dict[str, dict[str, int]] = Field(
        description="what the replica that answered for each model stage (model: the two-stage model; generalist "
        "and specialist: the per-stage graph; network: the single-network app) holds in memory apart from "
        "activations, in bytes by component — network, router, deltas (held packed), decoded_cache, "
        "decode_working_set (the most one routed group's decode holds at once) — and their total")


class Problem(BaseModel):
    detail: str = Field(description="why the request was refused, one line")


# Request bodies /predict accepts, for the OpenAPI page (the handler reads the raw request).
PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/webp": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    "required": ["file"],
                }
            },
            "application/json": {
                "schema": {
                    "oneOf": [
                        {"type": "object", "properties": {"image": {"type": "string", "format": "byte"}}, "required": ["image"]},
                        {
                            "type": "object",
                            "properties": {"images": {"type": "array", "items": {"type": "string", "format": "byte"}}},
                            "required": ["images"],
                        },
                    ]
                }
            },
        },
    }
}
