"""Subcommand definitions: each `add_*` registers arguments and binds a plain function that does the work.

Heavy imports happen inside the functions so `minigpt4qwen --help` stays instant.
"""

from __future__ import annotations

import argparse

OVERRIDES_HELP = "dotted key=value overrides of the config, e.g. train.max_steps=100 model.trainable.language_model=true"


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a tiny model on a synthetic VQA task on the CPU, report held-out accuracy",
                       description="The embedded default job: generates coloured-shape images with English and Chinese "
                                   "questions, trains a tiny MiniGPT4Qwen (every part trainable), reports held-out "
                                   "accuracy against chance, saves a checkpoint and answers one question.")
    p.add_argument("--output-dir", default="outputs/demo", help="where data, checkpoints and metrics go")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo's tuned value)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from minigpt4qwen.demo import run

    return run(args)


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train from a YAML config (one process, or many under torchrun)",
                       description="Train (or resume with train.resume=auto) the run described by CONFIG. "
                                   "Multi-GPU: torchrun --nproc_per_node N -m minigpt4qwen.cli.main train CONFIG")
    p.add_argument("config", help="YAML with model, data and train sections (see configs/)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from minigpt4qwen.training.entry import train_main

    train_main(args.config, args.overrides)
    return 0


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write the whole model as a Hugging Face Blip2ForConditionalGeneration directory",
                       description="Assemble the model of CONFIG (LLM + vision + Q-Former + checkpoint) and write "
                                   "OUT_DIR: config, safetensors shards, tokenizer with chat template, image processor. "
                                   "It reloads with transformers' Blip2ForConditionalGeneration.from_pretrained(OUT_DIR).")
    p.add_argument("config")
    p.add_argument("out_dir")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--max-shard-size", default="5GB")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from minigpt4qwen.checkpoint.assemble import build_model
    from minigpt4qwen.checkpoint.export import export_hf
    from minigpt4qwen.config import load_config
    from minigpt4qwen.training.config import RunConfig

    cfg = load_config(args.config, args.overrides, RunConfig)
    model, tokenizer = build_model(cfg.model)
    out = export_hf(model, tokenizer, args.out_dir, max_shard_size=args.max_shard_size)
    print(f"exported to {out}")
    return 0


def add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    check = data_sub.add_parser("check", help="read every record and image of the config's datasets and report problems",
                                description="Validates the data section of CONFIG before any GPU time is spent: "
                                            "missing/corrupt images, malformed records, samples left without "
                                            "supervised tokens after truncation; prints per-file counts and length stats.")
    check.add_argument("config")
    check.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    check.add_argument("--no-images", action="store_true", help="skip decoding the images (faster)")
    check.set_defaults(func=run_data_check)


def run_data_check(args: argparse.Namespace) -> int:
    from minigpt4qwen.checkpoint.llm import placeholder_token_id
    from minigpt4qwen.config import load_config
    from minigpt4qwen.data.check import check_dataset
    from minigpt4qwen.presets import resolve_preset
    from minigpt4qwen.text.qwen_tokenizer import load_tokenizer
    from minigpt4qwen.training.config import RunConfig

    cfg = load_config(args.config, args.overrides, RunConfig)
    model_cfg = resolve_preset(cfg.model)
    if model_cfg.llm is None:
        raise ValueError("model.llm is not set: the tokenizer is needed to check lengths")
    tokenizer = load_tokenizer(model_cfg.llm)
    image_token_id = (tokenizer.convert_tokens_to_ids(model_cfg.placeholder_token) if model_cfg.placeholder_token
                      else placeholder_token_id(tokenizer))
    report = check_dataset(cfg.data, tokenizer, image_token_id=image_token_id,
                           num_query_tokens=model_cfg.num_query_tokens, open_images=not args.no_images)
    print(report.format())
    return 0 if report.ok else 1


def add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat in the terminal (or answer one --query and exit)")
    p.add_argument("--model-type", choices=["qwen7b_chat", "qwen14b_chat"], default="qwen7b_chat",
                   help="preset that finds the weights in the original cache/ckpt layout")
    p.add_argument("-c", "--checkpoint", help="trained checkpoint: ours, or the original project's model.pth")
    p.add_argument("--config", help="YAML whose model section replaces the preset")
    p.add_argument("--cache-root", default="cache")
    p.add_argument("--cpu-only", action="store_true")
    p.add_argument("--image", action="append", default=[], help="image path (repeatable)")
    p.add_argument("--query", help="answer this once and exit")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.set_defaults(func=run_chat)


def run_chat(args: argparse.Namespace) -> int:
    from minigpt4qwen.cli.chat import chat_main

    return chat_main(args)


REGISTER = [add_demo, add_train, add_export, add_data, add_chat]
