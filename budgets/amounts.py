"""Amounts for people: base units shown in the token's decimals with its symbol ("5 OPG",
"0.2 USDC"). Used by the admin API's display fields and by the CLI's tables; standard library only,
so the CLI stays light."""

from __future__ import annotations

Assets = dict[tuple[str, str], tuple[str, int]]  # (network, lowercase asset) -> (symbol, decimals)


def format_units(amount: int, decimals: int) -> str:
    """The exact decimal form of `amount` base units: format_units(200_000, 6) == "0.2"."""
    digits = str(amount).rjust(decimals + 1, "0")
    whole, frac = (digits[:-decimals], digits[-decimals:].rstrip("0")) if decimals else (digits, "")
    return f"{whole}{'.' + frac if frac else ''}"


def display(amount: int, network: str, asset: str, assets: Assets) -> str | None:
    """Exact decimal form with the token's symbol ("5 OPG", "0.2 USDC"), or None if unknown."""
    known = assets.get((network, asset.lower()))
    if known is None:
        return None
    symbol, decimals = known
    return f"{format_units(amount, decimals)} {symbol}"


def symbol_of(network: str, asset: str, assets: Assets) -> str:
    """The asset's symbol, or its address when unknown."""
    known = assets.get((network, asset.lower()))
    return known[0] if known else asset
