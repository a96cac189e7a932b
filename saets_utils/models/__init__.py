"""Language model and SAE: loading, the embedded assets, SAE training, tiny test stand-ins."""
