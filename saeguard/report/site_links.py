"""Links from OOD explanations to the latent pages of a `saeguard browse` site."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

LATENT_PAGE = "latent.html?i={latent}"
"""A latent's page, relative to the site's folder (the site also accepts ``latent.html#N``)."""


def latent_href(prefix: str, latent: int) -> str:
    """The address of ``latent``'s page under ``prefix`` (the site's address, ending in /)."""
    return prefix + LATENT_PAGE.format(latent=int(latent))


def add_latent_pages(rows: Iterable[dict[str, Any]], prefix: str) -> None:
    """Give every explained latent of ``rows`` (``ood score`` rows or benchmark examples) a
    ``page``: the address of its page in the site at ``prefix``."""
    for row in rows:
        for latent in row.get("explanation") or []:
            latent["page"] = latent_href(prefix, latent["latent"])
