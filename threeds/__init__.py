"""threeds: 3DS (Decomposed Difficulty Data Selection) for domain-adaptive SFT data."""

__version__ = "0.1.0"
