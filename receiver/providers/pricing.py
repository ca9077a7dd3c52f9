"""What a task costs, per provider, mode and action, and the ledger report.

The defaults are the providers' own tables (``seeds/``): OhMyGPT in tokens per mode, AIGC2D in
points. midjourney-proxy is self-hosted and has no price: its tasks cost nothing unless a
``PRICES_FILE`` (the same JSON shape as `DEFAULT_PRICES`) says otherwise.

Amounts are integers of the provider's unit, so the ledger adds exactly (HINCRBY). A task is
charged when the provider accepts it and refunded when it fails, where the provider refunds:
AIGC2D says so, and OhMyGPT charges only a task that succeeds, which nets the same. The
charge and refund are written by the transition script itself (see `store`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

# mode "-": the provider has no modes
DEFAULT_PRICES: dict[str, dict[str, Any]] = {
    "ohmygpt": {
        "unit": "tokens",
        "refund_on_failure": True,
        "modes": {
            "FAST": {"IMAGINE": 14000, "UPSCALE": 3500, "VARIATION": 14000, "REROLL": 14000,
                     "ZOOM": 14000, "PAN": 14000, "DESCRIBE": 3500, "BLEND": 14000},
            "NORMAL": {"IMAGINE": 7000, "UPSCALE": 1750, "VARIATION": 7000, "REROLL": 7000,
                       "ZOOM": 7000, "PAN": 7000, "DESCRIBE": 1750, "BLEND": 7000},
        },
    },
    "aigc2d": {
        "unit": "points",
        "refund_on_failure": True,
        "modes": {"-": {"IMAGINE": 100, "UPSCALE": 10, "VARIATION": 50, "DESCRIBE": 50,
                        "BLEND": 100}},
    },
}


class PricesError(ValueError):
    """A prices file that cannot be used."""


@dataclass(frozen=True)
class Price:
    amount: int
    unit: str
    refund_on_failure: bool

    def ledger_field(self, provider: str, mode: str | None, action: str) -> str:
        """The ledger's counter prefix for tasks of this kind."""
        return f"{provider}|{mode or '-'}|{action}|{self.unit}"


class PriceTable:
    def __init__(self, table: dict[str, dict[str, Any]]) -> None:
        self.table = table
        for provider, entry in table.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("unit"), str) or (
                    not entry["unit"] or "|" in entry["unit"]):
                raise PricesError(f"prices of {provider!r} need a 'unit' (a name without |)")
            modes = entry.get("modes") or {}
            if not isinstance(modes, dict) or not all(isinstance(a, dict) for a in
                                                      modes.values()):
                raise PricesError(f"prices of {provider!r}: 'modes' maps each mode to "
                                  "{action: amount}")
            for mode, actions in modes.items():
                for action, amount in actions.items():
                    if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
                        raise PricesError(f"{provider} {mode} {action}: prices are integers "
                                          "of the unit, 0 or more")

    @classmethod
    def load(cls, path: str | None) -> PriceTable:
        """The defaults, with a prices file's providers replacing theirs."""
        table = dict(DEFAULT_PRICES)
        if path:
            try:
                table.update(orjson.loads(Path(path).read_bytes()))
            except (OSError, orjson.JSONDecodeError, TypeError, ValueError) as exc:
                raise PricesError(f"PRICES_FILE {path}: {exc}") from exc
        return cls(table)

    def price(self, provider: str, mode: str | None, action: str) -> Price | None:
        entry = self.table.get(provider)
        if entry is None:
            return None
        amount = (entry.get("modes") or {}).get(mode or "-", {}).get(action)
        if amount is None:
            return None
        return Price(amount, entry["unit"], bool(entry.get("refund_on_failure")))


def usage_report(counters: dict[bytes, bytes]) -> dict[str, Any]:
    """The ledger hash -> ``GET /usage``: totals per unit, and one row per provider, mode and
    action."""
    rows: dict[tuple[str, ...], dict[str, Any]] = {}
    for name, value in counters.items():
        if name.startswith(b"@"):  # the budget's count (`@committed|<unit>`), not a row
            continue
        provider, mode, action, unit, counter = name.decode().split("|")
        row = rows.setdefault((provider, mode, action, unit), {
            "provider": provider, "mode": None if mode == "-" else mode, "action": action,
            "unit": unit, "tasks": 0, "spent": 0, "refunded": 0})
        row[counter] = int(value)
    totals: dict[str, dict[str, int]] = {}
    for row in rows.values():
        row["net"] = row["spent"] - row["refunded"]
        total = totals.setdefault(row["unit"], {"tasks": 0, "spent": 0, "refunded": 0, "net": 0})
        for counter in total:
            total[counter] += row[counter]
    return {"totals": totals, "by": sorted(rows.values(), key=lambda r: (
        r["provider"], r["mode"] or "", r["action"]))}
