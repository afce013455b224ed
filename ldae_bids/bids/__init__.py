"""BIDS input discovery and BIDS-Derivatives output."""
