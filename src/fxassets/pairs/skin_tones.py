"""The Monk Skin Tone scale in one place: the swatches the quality measures estimate against, the words generated
sources are prompted with, and the three coarse groups that both the generated sources are balanced on and the
quality gate's balance report measures (Monk 1-4 / 5-6 / 7-10, docs/quality.md)."""

from __future__ import annotations

# Monk Skin Tone scale swatches (sRGB, Ellis Monk / Google, CC BY 4.0) and their ITA in degrees.
MONK_HEX = ("f6ede4", "f3e7db", "f7ead0", "eadaba", "d7bd96", "a07e56", "825c43", "604134", "3a312a", "292420")
MONK_TONES: dict[int, str] = {
    1: "very fair", 2: "fair", 3: "light", 4: "light beige", 5: "tan",
    6: "medium brown", 7: "brown", 8: "dark brown", 9: "deep brown", 10: "very deep brown",
}
# coarse groups for the balance report: Monk 1-4 / 5-6 / 7-10 (see docs/quality.md)
SKIN_GROUPS = {"light": (1, 2, 3, 4), "medium": (5, 6), "dark": (7, 8, 9, 10)}


def skin_group(tone: int) -> str:
    return next(g for g, tones in SKIN_GROUPS.items() if tone in tones)
