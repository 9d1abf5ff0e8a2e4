"""One quantized Linear at the LLM's shapes, by rows: where a quantized model's first token goes.

    python -m benchmarks.quant_matmul --size 14b            # one GPU, ~1 minute
    python -m benchmarks.quant_matmul --size tiny --device cpu   # a smoke test of the script

For each layer shape of the Qwen-7B/14B-Chat LLM (fused q/k/v, attention output, fused gate/up, down, the output
head) and each row count (1 for a decode step, ~95 for a 63-token prompt with one image's 32 placeholders), the
time of one layer call in bf16 and through torchao's int8 / int4 weight-only tensors as `--quantize` makes them
(`model/quantization.py`), eager (CUDA-event timed, median of repeats). A prefill runs every block's layers once
at ~95 rows; a decode step at one. "int4" is the layer as the model runs it (from `DEQUANT_MIN_ROWS` rows on, a
bf16 matmul over the dequantized weight: `model/int4_many_rows.py`); "int4 tinygemm" is torchao's int4 matmul at
every row count, whose cost grows with the rows (its kernel is built for a few); "int4 dequantization alone" is
what the many-row path adds to a bf16 matmul (the same at every row count); the int8 rows show what the per-call
cast of the weight costs. "bf16+gemlite" is the bf16 weight through gemlite's 16-bit kernels (`W_nbits=16`, no
scales): whether its one-row GEMV reads the weight faster than cuBLAS's, the bound of bf16 batch-1 decoding.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import CONFIGS, machine, sync
from minigpt4qwen.model.int4_many_rows import ManyRowInt4Linear, dequantize_int4_weight
from minigpt4qwen.model.quantization import quantize_llm_weights

ROWS = (1, 16, 32, 64, 96, 128)


def layer_shapes(size: str) -> dict[str, tuple[int, int]]:
    """(out, in) features of each Linear of one block, and of the head, for `size`."""
    if size == "tiny":
        return {"qkv": (3 * 128, 128), "down": (128, 256), "head": (1024, 128)}
    config = json.loads((CONFIGS / f"qwen{size}_chat.json").read_text())
    hidden, ffn = config["hidden_size"], config["intermediate_size"] // 2  # Qwen1 counts gate and up together
    return {"qkv": (3 * hidden, hidden), "attn out": (hidden, hidden), "gate+up": (2 * ffn, hidden),
            "down": (hidden, ffn), "head": (config["vocab_size"], hidden)}


def gemlite_bf16_linear(linear: nn.Linear) -> nn.Module:
    """`linear`'s bf16 weight as gemlite's 16-bit layer (no scales, no zeros: its plain bf16 x bf16 kernels)."""
    from minigpt4qwen.model.gemlite_layers import import_gemlite

    gemlite = import_gemlite()
    layer = gemlite.GemLiteLinearTriton(W_nbits=16, group_size=None, in_features=linear.in_features,
                                        out_features=linear.out_features, input_dtype=gemlite.DType.BF16,
                                        output_dtype=gemlite.DType.BF16)
    layer.pack(linear.weight.data, scales=None, zeros=None, bias=None)
    return layer


def time_call(call, device: str, repeats: int = 20) -> float:
    """Median milliseconds of `call()`."""
    for _ in range(3):
        call()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            import time

            begin = time.perf_counter()
            call()
            times.append(1000 * (time.perf_counter() - begin))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="7b", choices=["7b", "14b", "tiny"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modes", default="bf16,int8,int4", help="of bf16, int8, int4, bf16+gemlite (CUDA)")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    modes = args.modes.split(",")
    print(f"# one Linear by rows, MiniGPT4Qwen-{args.size} LLM shapes, eager | {machine()}")
    print(f"# python -m benchmarks.quant_matmul {' '.join(f'--{k} {v}' for k, v in vars(args).items())}")
    print("\n| layer (out x in) | mode | " + " | ".join(f"{m} rows, ms" for m in ROWS) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in ROWS) + " |")
    with torch.no_grad():
        for name, (out_features, in_features) in layer_shapes(args.size).items():
            for mode in modes:
                if name == "head" and mode == "int4":
                    continue  # the head is int8 in both modes (`model/quantization.py`)
                holder = nn.Module()  # quantize_llm_weights quantizes the Linear layers of a module
                holder.layer = nn.Linear(in_features, out_features, bias=False, device=args.device, dtype=dtype)
                nn.init.normal_(holder.layer.weight, std=0.02)
                if mode == "bf16+gemlite":
                    holder.layer = gemlite_bf16_linear(holder.layer)
                elif mode != "bf16":
                    quantize_llm_weights(holder, mode)
                weight = holder.layer.weight
                calls = {mode: holder.layer}
                if mode == "int4":
                    calls["int4 tinygemm"] = lambda x, weight=weight: F.linear(x, weight)
                if isinstance(holder.layer, ManyRowInt4Linear):  # CUDA: what the many-row path adds to a bf16 matmul
                    calls["int4 dequantization alone"] = lambda x, weight=weight: dequantize_int4_weight(weight)
                for label, call in calls.items():
                    cells = []
                    for rows in ROWS:
                        x = torch.randn(rows, in_features, device=args.device, dtype=dtype)
                        cells.append(f"{time_call(lambda x=x: call(x), args.device):.3f}")
                    print(f"| {name} ({out_features} x {in_features}) | {label} | {' | '.join(cells)} |", flush=True)
                holder = weight = calls = None
                sync(args.device)

if __name__ == "__main__":
    main()
