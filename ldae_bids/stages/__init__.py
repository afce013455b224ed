"""Built-in stages. They register through the ``ldae_bids.stages`` entry points like any plugin."""
