"""Decoding engines: the batch-1 CUDA-graph decoder and the continuous-batching scheduler over a slot KV cache."""
