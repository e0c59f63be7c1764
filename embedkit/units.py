"""How sizes are written for people (a leaf module)."""


def human_bytes(n: float) -> str:
    """1536 -> "1.5 KB"; whole bytes below 1 KB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            break
        n /= 1024
    return f"{n:,.0f} B" if unit == "B" else f"{n:,.1f} {unit}"
