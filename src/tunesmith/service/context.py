"""What the routes work with: one ``Service`` per application, reached through the request.

Its own module so that the application (``app``) can include the routes (``routes``) and the
routes can depend on the service without the two importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from tunesmith.service.chat import ChatService
from tunesmith.service.inference import ModelCache
from tunesmith.service.settings import ServiceSettings
from tunesmith.service.store import Store


@dataclass
class Service:
    """What the routes work with; one per application."""

    settings: ServiceSettings
    store: Store
    cache: ModelCache
    chat: ChatService


def get_service(request: Request) -> Service:
    return request.app.state.service
