"""Command-line interfaces: ``ldae-bids`` (the BIDS App) and ``ldae-bids-tools``."""
