"""``supersub report``: the misclassification-pattern report (placeholder until it is written)."""

from __future__ import annotations

from typing import Any


def register(subparsers: Any) -> None:
    del subparsers  # registered once the report module exists
