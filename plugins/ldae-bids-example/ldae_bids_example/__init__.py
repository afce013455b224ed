"""Example ldae-bids stage plugins."""
