"""The provider fixtures in tests/fixtures/providers: what the real servers send, by source.

Layout: ``<provider>/<flavour or "->/<kind>-<what>.json``, kinds ``callback`` (a notifyHook /
webhook body), ``fetch`` (a task read back, or the answer for an unknown id), ``list`` (a
list-by-condition answer), ``answer`` (a submit answer) and ``http`` (bare HTTP refusals).
Each file is ``{source, note, http_status, body, raw?}``; ``raw`` is the exact body text where
the bytes matter (an empty body, ``\\uXXXX`` escapes, integers past 2^53).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "providers"


@dataclass(frozen=True, slots=True)
class ProviderFixture:
    path: Path
    provider: str  # "mjproxy", "ohmygpt", "aigc2d": a key of receiver.dialects.DIALECTS
    flavour: str | None  # "novicezk" / "trueai" for mjproxy, else None
    name: str  # the file name without ".json", e.g. "callback-success-imagine"
    source: str
    note: str
    http_status: int
    body: Any  # the decoded body (None for an empty or non-JSON one)
    raw: str | None

    @property
    def kind(self) -> str:
        return self.name.split("-", 1)[0]

    @property
    def body_bytes(self) -> bytes:
        """The body as sent: ``raw`` if given, else ``body`` as compact UTF-8 JSON (what
        Jackson writes)."""
        if self.raw is not None:
            return self.raw.encode()
        return json.dumps(self.body, ensure_ascii=False, separators=(",", ":")).encode()

    @property
    def id(self) -> str:
        """``mjproxy/novicezk/callback-describe``: a readable pytest id."""
        return self.path.relative_to(FIXTURES).with_suffix("").as_posix()


def load_fixtures(provider: str | None = None, kind_prefix: str | None = None,
                  flavour: str | None = None) -> list[ProviderFixture]:
    """Every fixture, sorted by path; narrowed to one provider, a name prefix (``"callback"``,
    ``"answer-queue"``...) and a flavour directory (``"novicezk"``, ``"trueai"``, ``"-"``)."""
    out = []
    for path in sorted(FIXTURES.glob("*/*/*.json")):
        prov, flav = path.parent.parent.name, path.parent.name
        if provider is not None and prov != provider:
            continue
        if flavour is not None and flav != flavour:
            continue
        if kind_prefix is not None and not path.stem.startswith(kind_prefix):
            continue
        doc = json.loads(path.read_text(encoding="utf-8"))
        out.append(ProviderFixture(
            path=path, provider=prov, flavour=None if flav == "-" else flav, name=path.stem,
            source=doc["source"], note=doc["note"], http_status=doc["http_status"],
            body=doc["body"], raw=doc.get("raw"),
        ))
    return out


def load_fixture(relative: str) -> ProviderFixture:
    """One fixture by its path under tests/fixtures/providers, e.g.
    ``"mjproxy/trueai/answer-queue-full.json"`` (the ``.json`` may be left out)."""
    path = FIXTURES / (relative if relative.endswith(".json") else relative + ".json")
    found = [f for f in load_fixtures() if f.path == path]
    if not found:
        raise FileNotFoundError(path)
    return found[0]
