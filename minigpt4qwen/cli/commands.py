"""Subcommand definitions: each `add_*` registers arguments and binds a plain function that does the work.

Heavy imports happen inside the functions so `minigpt4qwen --help` stays instant.
"""

from __future__ import annotations

import argparse
import os

from minigpt4qwen.cli.eval_command import add_eval

OVERRIDES_HELP = ("dotted key=value overrides of the config, e.g. train.max_steps=100 "
                  "model.trainable.language_model=true")


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a tiny model on a synthetic VQA task on the CPU, report held-out accuracy",
                       description="The embedded default job: generates coloured-shape images with English and Chinese "
                                   "questions, trains a tiny MiniGPT4Qwen (every part trainable), reports held-out "
                                   "accuracy against chance and writes OUTPUT_DIR/model, a model directory that chat, "
                                   "generate, webui, serve and export take with --model-dir.")
    p.add_argument("--output-dir", default="outputs/demo", help="where data, checkpoints, metrics and model/ go")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo's tuned value)")
    p.add_argument("--train-images", type=int, default=None, help="training pictures (default: the demo's tuned value)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1: best for its tiny model)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from minigpt4qwen.demo import run

    return run(args)


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train from a YAML config (one process, or many under torchrun)",
                       description="Train the run described by CONFIG; run the same command again to resume it "
                                   "(train.resume=auto, the default). Options go before or after all the overrides. "
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
                                   "OUT_DIR: config, safetensors shards, tokenizer with chat template, image "
                                   "processor. It reloads with transformers' "
                                   "Blip2ForConditionalGeneration.from_pretrained(OUT_DIR) (not with --quantize: "
                                   "those load with minigpt4qwen). Options go before or after all the overrides."
                                   " With --model-dir DIR instead of CONFIG, DIR (an export, or the demo's model) is "
                                   "written again, e.g. with other shard sizes.")
    p.add_argument("config", nargs="?", help="YAML with a model section (omit with --model-dir)")
    p.add_argument("out_dir")
    p.add_argument("--model-dir", help="a directory written by `minigpt4qwen export` or `minigpt4qwen demo`")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--quantize", choices=("int8", "int4"),
                   help="write the LLM's weights quantized by torchao, as model.quantize does (int4: with --device "
                        "cuda)")
    p.add_argument("--device", default="cpu", help="where the model is built (cuda: needed for int4, which is "
                   "packed for CUDA GPUs; default: cpu)")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from minigpt4qwen.checkpoint.assemble import build_model
    from minigpt4qwen.checkpoint.export import export_hf, load_exported
    from minigpt4qwen.config import load_config
    from minigpt4qwen.training.config import RunConfig

    if (args.model_dir is None) == (args.config is None):
        raise ValueError("export takes one source: CONFIG (a YAML file) or --model-dir DIR, then OUT_DIR")
    if args.model_dir is not None:
        if args.overrides:
            raise ValueError(f"config overrides {args.overrides} do not apply to --model-dir {args.model_dir}")
        model, tokenizer = load_exported(args.model_dir, quantize=args.quantize, device=args.device)
    else:
        quantize = [f"model.quantize={args.quantize}"] if args.quantize else []
        # fresh_projection=False: an export is for answering, and an untrained projection answers nonsense.
        model, tokenizer = build_model(load_config(args.config, [*args.overrides, *quantize], RunConfig).model,
                                       device=args.device, fresh_projection=False)
    out = export_hf(model, tokenizer, args.out_dir, max_shard_size=args.max_shard_size)
    print(f"exported to {out}")
    return 0


def add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    check = data_sub.add_parser("check",
                                help="read every record and image of the config's datasets and report problems",
                                description="Validates the data section of CONFIG before any GPU time is spent: "
                                            "missing/corrupt images, malformed records, samples left without "
                                            "supervised tokens after truncation; prints per-file counts and "
                                            "length stats.")
    check.add_argument("config")
    check.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    check.add_argument("--no-images", action="store_true", help="skip decoding the images (faster)")
    check.set_defaults(func=run_data_check)


def run_data_check(args: argparse.Namespace) -> int:
    from minigpt4qwen.checkpoint.llm import placeholder_token_id
    from minigpt4qwen.checkpoint.vision_sizes import model_architecture
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
    trained = [part for part, on in model_cfg.trainable.as_dict().items()
               if on or (part == "language_model" and cfg.train.lora.enabled)]
    queries = model_cfg.num_query_tokens or model_architecture(model_cfg).num_query_tokens  # unset: the weights'
    report = check_dataset(cfg.data, tokenizer, image_token_id=image_token_id,
                           num_query_tokens=queries, open_images=not args.no_images,
                           trained_parts=trained)
    print(report.format())
    return 0 if report.ok else 1


def add_chat(sub: argparse._SubParsersAction) -> None:
    from minigpt4qwen.inference.loading import add_decoder_options, add_generation_options, add_model_options

    p = sub.add_parser("chat", help="chat in the terminal (or answer one --query and exit)",
                       description="Enter image paths (:f to finish), then chat; :h lists the commands. "
                                   "With --image the image step is skipped; with --query one answer goes to stdout.")
    add_model_options(p)
    add_decoder_options(p)
    add_generation_options(p, seed=42)  # the original demo's seed
    p.add_argument("--image", action="append", default=[], help="image path (repeatable)")
    p.add_argument("--query", help="answer this once and exit")
    _add_conversation_options(p)
    p.set_defaults(func=run_chat)


def run_chat(args: argparse.Namespace) -> int:
    from minigpt4qwen.cli.chat import chat_main

    return chat_main(args)


def add_generate(sub: argparse._SubParsersAction) -> None:
    from minigpt4qwen.inference.loading import add_generation_options, add_model_options
    from minigpt4qwen.inference.scheduler_options import add_scheduler_options

    p = sub.add_parser("generate", help="answer a JSON/JSONL file of prompts with images, write JSONL answers",
                       description='Batch inference: INPUT is a JSON list or JSONL of {"id"?, "image": path | [paths], '
                                   '"query" | "instruction": str} (the original training format works too); OUTPUT '
                                   'gets one {"id", "query", "answer"} line per record, in input order. Records '
                                   'are decoded together (continuous batching, up to 2 x --slots in flight); '
                                   'sampling uses one seed per record, derived from --seed and its index.')
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--image-root", help="folder relative image paths start from (default: the input file's folder)")
    p.add_argument("--on-error", choices=["skip", "fail"], default="skip",
                   help="a bad record (malformed, missing or corrupt image, or its generation failed, e.g. a prompt "
                        "longer than --slot-tokens): report and skip it, or stop")
    _add_conversation_options(p, window=False)
    add_model_options(p)
    add_scheduler_options(p)
    add_generation_options(p)
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from minigpt4qwen.inference.frontends.batch import generate_main

    return generate_main(args)


def add_webui(sub: argparse._SubParsersAction) -> None:
    from minigpt4qwen.inference.loading import add_model_options
    from minigpt4qwen.inference.scheduler_options import add_scheduler_options

    p = sub.add_parser("webui", help="chat in the browser (gradio): upload images, streamed replies",
                       description="Serves the web UI at http://HOST:PORT; 127.0.0.1 by default (this machine only). "
                                   "The replies of every browser tab are decoded together (continuous batching).")
    add_model_options(p)
    add_scheduler_options(p)
    _add_bind_options(p, port=7860, note="there is no authentication")
    p.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    _add_conversation_options(p)
    p.set_defaults(func=run_webui)


def run_webui(args: argparse.Namespace) -> int:
    from minigpt4qwen.inference.frontends.webui import launch
    from minigpt4qwen.inference.loading import load_for_inference
    from minigpt4qwen.inference.scheduler_options import build_scheduler
    from minigpt4qwen.text.qwen_tokenizer import DEFAULT_SYSTEM_PROMPT

    model, tokenizer = load_for_inference(args)
    scheduler = build_scheduler(model, tokenizer, args)
    try:
        launch(model, tokenizer, scheduler, host=args.host, port=args.port, share=args.share,
               system_prompt=args.system_prompt or DEFAULT_SYSTEM_PROMPT, max_window_size=args.max_window_size)
    finally:
        scheduler.close()
    return 0


def add_serve(sub: argparse._SubParsersAction) -> None:
    from minigpt4qwen.inference.loading import add_model_options
    from minigpt4qwen.inference.scheduler_options import add_scheduler_options

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (POST /v1/chat/completions, GET /v1/models)",
                       description="Serves the model at http://HOST:PORT/v1 for any OpenAI client; images come as "
                                   "data: URIs. 127.0.0.1 by default (this machine only); every request in flight is "
                                   "decoded together (continuous batching).")
    add_model_options(p)
    add_scheduler_options(p)
    _add_bind_options(p, port=8000, note="set --api-key then")
    p.add_argument("--model-name", default="minigpt4qwen", help="the model id reported to clients")
    p.add_argument("--allow-local-files", action="store_true",
                   help="also accept image_url local paths and file:// URLs (trusted clients only: they can read "
                        "any image this process can)")
    p.add_argument("--max-body-mb", type=float, default=20, help="larger requests get 413")
    p.add_argument("--max-images", type=int, default=8, help="more images in one request get 400")
    _add_conversation_options(p, system_prompt=False)
    p.add_argument("--api-key", default=os.environ.get("MINIGPT4QWEN_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $MINIGPT4QWEN_API_KEY; none: open)")
    p.add_argument("--max-queue", type=int, default=128,
                   help="requests decoding or waiting at once; more get 429 (Retry-After: 1)")
    p.add_argument("--frontend-processes", type=int, default=0, metavar="N",
                   help="run the HTTP server (parsing, images, tokenizing, streaming) in N processes of their own on "
                        "the same port, not in the model's process (0, the default): bursts of requests are then "
                        "prepared on N cores")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from minigpt4qwen.inference.frontends.openai_api.server import serve
    from minigpt4qwen.inference.loading import load_for_inference
    from minigpt4qwen.inference.scheduler_options import build_scheduler

    model, tokenizer = load_for_inference(args)
    scheduler = build_scheduler(model, tokenizer, args)
    app_options = dict(max_body_bytes=int(args.max_body_mb * 2**20), max_images=args.max_images,
                       max_window_size=args.max_window_size, api_key=args.api_key, max_queue=args.max_queue)
    try:
        if not args.frontend_processes:
            serve(model, tokenizer, args.model_name, host=args.host, port=args.port,
                  allow_local_files=args.allow_local_files, scheduler=scheduler, **app_options)
            return 0
        from minigpt4qwen.inference.frontends.openai_api.frontend_process import FrontendOptions, FrontendProcesses

        frontends = FrontendProcesses(model, tokenizer, scheduler, FrontendOptions(
            args.host, args.port, args.model_name, args.allow_local_files, app_options), args.frontend_processes)
        try:
            frontends.start()
        except OSError as err:
            raise SystemExit(str(err)) from None
        if code := frontends.run():
            raise SystemExit(f"an HTTP front-end process exited with code {code} (its log is above)")
    finally:
        scheduler.close()
    return 0


def add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="DeepSpeed / pipeline / original-project checkpoint -> native checkpoint",
                       description="Convert SRC (one of our DeepSpeed ZeRO-0..3 or pipeline checkpoints, or any "
                                   "checkpoint of the original project) into the native checkpoint directory OUT, "
                                   "which chat and training load.")
    p.add_argument("src", help="a checkpoint-N directory, an output_dir with a `latest` file, or an original "
                               "checkpoint (model.pth, global_stepN/, ...)")
    p.add_argument("out")
    p.add_argument("--parts", nargs="+", help="keep only these parts: language_projection (projection only), "
                                              "or language_projection language_model; default: all saved parts")
    p.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from minigpt4qwen.checkpoint.deepspeed_convert import convert_to_native

    print(f"converted to {convert_to_native(args.src, args.out, args.parts)}")
    return 0


REGISTER = [add_demo, add_train, add_export, add_convert, add_data, add_chat, add_generate, add_webui, add_serve,
            add_eval]


def _add_conversation_options(p: argparse.ArgumentParser, system_prompt: bool = True, window: bool = True) -> None:
    """--system-prompt and --max-window-size, as the chat front ends share them."""
    if system_prompt:
        p.add_argument("--system-prompt", help="the system message (default: Qwen's 'You are a helpful assistant.')")
    if window:
        p.add_argument("--max-window-size", type=int, default=6144,
                       help="prompt budget in tokens; older turns drop out")


def _add_bind_options(p: argparse.ArgumentParser, port: int, note: str) -> None:
    """--host (127.0.0.1 by default) and --port of a network front end."""
    p.add_argument("--host", default="127.0.0.1", help=f"interface to bind; 0.0.0.0 exposes it to the network ({note})")
    p.add_argument("--port", type=int, default=port)
