"""Scraping a /metrics endpoint in tests: the text, parsed by prometheus-client's own parser."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp
from prometheus_client.parser import text_string_to_metric_families


class Scrape:
    """One scrape: every sample by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """The sample with exactly these labels (0 when the series does not exist yet)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """The sum over every series of ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= ls)

    def series(self, name: str) -> list[Mapping[str, str]]:
        return [dict(ls) for (n, ls) in self.samples if n == name]


async def scrape(url: str) -> Scrape:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200, response.status
        assert response.headers["Content-Type"].startswith("text/plain")
        return Scrape(await response.text())
