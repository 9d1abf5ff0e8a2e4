"""`minigpt4qwen eval BENCHMARK --data PATH (--model-dir DIR | config options)` and `minigpt4qwen eval compare
A.json B.json`.

Heavy imports happen inside the functions so `minigpt4qwen --help` stays instant.
"""

from __future__ import annotations

import argparse
import sys

# name -> (what --data is, what --image-root is or None); the readers live in minigpt4qwen.evaluation.
DATA_HELP = {
    "mme": ("the MME_Benchmark_release_version folder", None),
    "mmbench": ("the released MMBench TSV (dev split, with answers)", None),
    "mmbench-cn": ("the released MMBench-CN TSV (dev split, with answers)", None),
    "pope": ("the folder of coco_pope_{random,popular,adversarial}.json, or one of them",
             "the COCO val2014 image folder (default: the data's folder)"),
    "seed-bench": ("SEED-Bench.json (only its image questions are asked)",
                   "the image folder (default: SEED-Bench-image/ beside the JSON)"),
    "vqa": ('a JSONL of {"id"?, "image", "question", "answers": [...]}',
            "where relative image paths start (default: the data file's folder)"),
    "caption": ('a JSONL of {"id"?, "image", "captions": [...]}',
                "where relative image paths start (default: the data file's folder)"),
}


def add_eval(sub: argparse._SubParsersAction) -> None:
    """Registers `eval` with one subcommand per benchmark, and `compare`."""
    from minigpt4qwen.inference.loading import add_model_options
    from minigpt4qwen.inference.scheduler_options import add_scheduler_options

    p = sub.add_parser("eval", help="score a model on MME, MMBench(-CN), POPE, SEED-Bench or a VQA/caption set",
                       description="Asks every question of a benchmark (greedy, in batches, decoded together by the "
                                   "generation scheduler), writes the predictions as they come (rerun the same "
                                   "command to continue a stopped run), scores them as the benchmark's own script "
                                   "does, and writes results.json and results.md.")
    benchmarks = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (data_help, root_help) in DATA_HELP.items():
        b = benchmarks.add_parser(name, help=data_help)
        b.add_argument("--data", required=True, help=data_help)
        if root_help:
            b.add_argument("--image-root", help=root_help)
        b.add_argument("--output-dir", help=f"predictions and results (default: outputs/eval/{name})")
        b.add_argument("--prompt", help="the prompt template, a str.format string over the benchmark's fields "
                                        "(default: the benchmark's; an unknown field is an error that lists them)")
        b.add_argument("--system-prompt", help="the system message (default: Qwen's 'You are a helpful assistant.')")
        b.add_argument("--max-new-tokens", type=int, help="answer length limit (default: the benchmark's)")
        b.add_argument("--batch-size", type=int,
                       help="questions handed to the scheduler at once, and the unit a stopped run asks again "
                            "(default: 4 x --slots, so that freed slots take the batch's next questions)")
        add_model_options(b)
        add_scheduler_options(b)
        b.set_defaults(func=run_eval)
    c = benchmarks.add_parser("compare", help="the difference of two results.json, per subtask / category")
    c.add_argument("a", help="results.json of the baseline")
    c.add_argument("b", help="results.json to compare with it")
    c.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    """Prints the comparison table of two results files."""
    from minigpt4qwen.evaluation.report import compare, load_results

    print(compare(load_results(args.a), load_results(args.b), names=("A", "B")), end="")
    return 0


def _model_record(args: argparse.Namespace, model) -> dict:
    """What identifies the model in the results (and must match when a run is resumed)."""
    import torch

    device = next(model.parameters()).device
    return {"model_dir": args.model_dir, "config": args.config, "checkpoint": args.checkpoint,
            "model_type": None if args.model_dir else args.model_type, "dtype": args.dtype,
            "quantize": getattr(model.config, "llm_quantization", None),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "parameters": sum(p.numel() for p in model.parameters())}


def run_eval(args: argparse.Namespace) -> int:
    """Reads the benchmark, loads the model, answers, scores; prints the table. Returns 1 when nothing was scored."""
    from pathlib import Path

    from minigpt4qwen.evaluation.answering import SchedulerAnswerer
    from minigpt4qwen.evaluation.benchmarks import BENCHMARKS
    from minigpt4qwen.evaluation.prompts import check_template
    from minigpt4qwen.evaluation.report import markdown
    from minigpt4qwen.evaluation.runner import evaluate
    from minigpt4qwen.inference.loading import load_for_inference
    from minigpt4qwen.inference.scheduler_options import build_scheduler
    from minigpt4qwen.text.qwen_tokenizer import DEFAULT_SYSTEM_PROMPT

    benchmark = BENCHMARKS[args.benchmark]
    template = check_template(benchmark.template if args.prompt is None else args.prompt, benchmark.fields,
                              benchmark.name)
    max_new_tokens = benchmark.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
    batch_size = 4 * args.slots if args.batch_size is None else args.batch_size
    if max_new_tokens < 1 or batch_size < 1:  # before the model loads
        raise ValueError(f"--max-new-tokens and --batch-size must be >= 1, got {max_new_tokens} and {batch_size}")
    root = getattr(args, "image_root", None)
    data = benchmark.read(Path(args.data), Path(root) if root else None)  # bad data shows before the model loads
    print(f"{benchmark.name}: {len(data.questions)} questions to ask of {data.total}; {len(data.skipped)} bad "
          "row(s) skipped", file=sys.stderr)
    for error in data.skipped[:20]:
        print(f"[skipped] {error}", file=sys.stderr)
    if len(data.skipped) > 20:
        print(f"[skipped] ... and {len(data.skipped) - 20} more (all listed in results.json)", file=sys.stderr)
    model, tokenizer = load_for_inference(args)
    system_prompt = args.system_prompt or DEFAULT_SYSTEM_PROMPT
    settings = {"prompt_template": template, "system_prompt": system_prompt, "max_new_tokens": max_new_tokens,
                "decoding": "greedy", "image_root": root,
                "batch_size": batch_size}  # resumed batches must be the same batches: answers may depend on them
    out_dir = Path(args.output_dir or f"outputs/eval/{benchmark.name}")
    scheduler = build_scheduler(model, tokenizer, args)
    try:
        results, made = evaluate(benchmark, data, args.data, out_dir,
                                 SchedulerAnswerer(scheduler, max_new_tokens, system_prompt), template=template,
                                 settings=settings, model=_model_record(args, model),
                                 batch_size=batch_size)
    finally:
        scheduler.close()
    if made.answered_now:
        print(f"answered {made.answered_now} question(s) in {made.seconds:.1f} s "
              f"({made.answered_now / made.seconds:.2f} questions/s)", file=sys.stderr)
    print(markdown(results), end="")
    print(f"results: {out_dir / 'results.json'}, {out_dir / 'results.md'}", file=sys.stderr)
    return 0 if results["questions"]["scored"] else 1
