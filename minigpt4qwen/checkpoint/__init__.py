"""Checkpoint formats: key maps, loaders for every real file layout, our own checkpoints and the HF export."""
