"""The `llama4-local` command line: thin, it parses options, calls the library and renders.

torch and the model code are imported inside the commands, so `--help` answers at once.
Exit codes: 0 success, 1 runtime failure, 2 bad usage or input, 130 interrupted.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from llama4_local.cli_common import (
    ContextOpt,
    DeviceOpt,
    DtypeOpt,
    GpuMemoryOpt,
    HostMemoryOpt,
    Int8AttentionOpt,
    MinPOpt,
    MissOpt,
    MmapOpt,
    ModelOpt,
    PolicyOpt,
    PrefetchOpt,
    PrefillChunkOpt,
    RepetitionOpt,
    RevisionOpt,
    SeedOpt,
    SessionContextOpt,
    SlotsOpt,
    TemperatureOpt,
    ThreadsOpt,
    TopKOpt,
    TopPOpt,
    VerboseOpt,
    VisionOpt,
    _model,
    _offload_options,
    _parse_size,
    _read_stdin,
    _run,
    _sampling,
    _threads,
    human,
)

# PyTorch's CPU allocator backs allocations of 2 MB and more with transparent huge pages when this
# is set (read once, before torch allocates; torch is imported inside the commands): a calibrated
# quantize of the Scout-width slice spent 97 s of 382 in the kernel, mostly page faults of large
# float32 temporaries; 63 of 346 with it.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

app = typer.Typer(
    name="llama4-local",
    help="Run Meta's Llama 4 (Scout) on one workstation: one GPU or the CPU alone.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """Run Meta's Llama 4 (Scout) on one workstation: one GPU or the CPU alone."""


@app.command()
def prompt(
    text: Annotated[str, typer.Argument(help="The prompt; '-' reads it from standard input.")],
    model: ModelOpt,
    revision: RevisionOpt = None,
    system: Annotated[str | None, typer.Option(help="System message for the chat template.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="No chat template: tokenize TEXT as is, with BOS.")] = False,
    image: Annotated[
        list[Path] | None,
        typer.Option("--image", "-i", help="An image (JPEG, PNG, WebP) to ask about; repeatable, in prompt order."),
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", "-n", help="Most tokens to generate (default: 512).")
    ] = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repetition_penalty: RepetitionOpt = None,
    seed: SeedOpt = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop when this text appears (repeatable).")] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Keep generating past end tokens.")] = False,
    dtype: DtypeOpt = "bfloat16",
    device: DeviceOpt = "auto",
    prefill_chunk: PrefillChunkOpt = 512,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming.")] = False,
    gpu_memory: GpuMemoryOpt = None,
    host_memory: HostMemoryOpt = None,
    expert_cache_slots: SlotsOpt = None,
    cache_policy: PolicyOpt = "auto",
    miss_policy: MissOpt = "auto",
    prefetch: PrefetchOpt = True,
    context: ContextOpt = None,
    record_routing: Annotated[
        Path | None, typer.Option(help="Write the experts each token chose, per layer, to this CSV file.")
    ] = None,
    int8_attention: Int8AttentionOpt = True,
    mmap: MmapOpt = None,
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Generate one reply to TEXT and print it as it is generated.

    Examples:

      llama4-local prompt "Why is the sky blue?" -m ~/models/Llama-4-Scout-17B-16E-Instruct

      cat notes.txt | llama4-local prompt - -m ./scout --system "Summarise in 3 bullets."

      llama4-local prompt "Once upon a time" -m ./scout --raw --temperature 0 --json

      llama4-local prompt "What does this chart show?" -m ./scout --image chart.png

      llama4-local prompt "Hi" -m ./scout-int4 --gpu-memory 24GiB --miss-policy auto
    """

    def go():
        _threads(threads)
        # One reply per process: the CUDA graph without compiled regions. Compiling them took some
        # 13 s per process on an H200 (session 14), which their 4 ms per token repays only after
        # about 3000 tokens; chat and serve, which live longer, compile (LLAMA4_LOCAL_COMPILE=1 here).
        os.environ.setdefault("LLAMA4_LOCAL_COMPILE", "0")
        from llama4_local.runner import PromptRequest, run_prompt

        off = _offload_options(gpu_memory, host_memory, expert_cache_slots, cache_policy, miss_policy, prefetch)

        body = _read_stdin() if text == "-" else text
        req = PromptRequest(
            model=_model(model, revision),
            text=body,
            system=system,
            raw=raw,
            max_tokens=max_tokens,
            sampling=_sampling(temperature, top_k, top_p, min_p, repetition_penalty, seed),
            stop=stop or [],
            ignore_eos=ignore_eos,
            dtype=dtype,
            device=device,
            prefill_chunk=prefill_chunk,
            offload=off,
            context=context,
            record_routing=record_routing,
            images=list(image or []),
            int8_attention=int8_attention,
            mmap=mmap,
        )
        out = sys.stdout
        result = run_prompt(req, on_text=None if as_json else lambda s: (out.write(s), out.flush()))
        if as_json:
            out.write(json.dumps(result.as_json(), ensure_ascii=False) + "\n")
        else:
            out.write("\n")
            sys.stderr.write(result.stats.line() + "\n")

    _run(go, verbose)


@app.command(name="eval")
def eval_(
    model: ModelOpt,
    text: Annotated[Path, typer.Option("--text", help="UTF-8 text file to score.")],
    revision: RevisionOpt = None,
    reference: Annotated[
        str | None, typer.Option(help="Checkpoint (or repo id) to compare with: KL divergence and top-1 agreement.")
    ] = None,
    ctx: Annotated[int, typer.Option(help="Tokens per window (each starts with BOS).")] = 512,
    max_windows: Annotated[int | None, typer.Option(help="Score at most this many windows.")] = None,
    dtype: DtypeOpt = "bfloat16",
    device: DeviceOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    int8_attention: Int8AttentionOpt = True,
    mmap: MmapOpt = None,
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Perplexity of MODEL on a text; with --reference, how far MODEL's predictions are from it.

    Examples:

      llama4-local eval -m ./scout-int4 --text wiki.txt

      llama4-local eval -m ./scout-int4 --reference ./scout --text wiki.txt --ctx 512 --json
    """

    def go():
        _threads(threads)
        from llama4_local.errors import UserError
        from llama4_local.evaluate import evaluate
        from llama4_local.loader import load_model
        from llama4_local.tokenizer import Tokenizer

        if not text.is_file():
            raise UserError(f"text file {text} does not exist")
        try:
            body = text.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{text} is not UTF-8 text") from None
        path = _model(model, revision)
        ref_path = _model(reference) if reference else None
        tok = Tokenizer(path)
        ids = tok.encode(body, add_special_tokens=False)
        m, _ = load_model(path, dtype, device, int8_attention=int8_attention, mmap=mmap)
        ref = load_model(ref_path, dtype, device)[0] if ref_path else None
        res = evaluate(m, ids, ctx, tok.bos_id, ref, max_windows)
        if as_json:
            sys.stdout.write(json.dumps(res.as_dict()) + "\n")
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{model} on {text.name}: {res.tokens} tokens in {res.windows} windows of {ctx}")
        table.add_column("measure")
        table.add_column("value", justify="right")
        table.add_row("perplexity", f"{res.perplexity:.4f}")
        if ref is not None:
            table.add_row("reference perplexity", f"{res.reference_perplexity:.4f}")
            table.add_row("KL mean", f"{res.kl_mean:.6f}")
            table.add_row("KL median", f"{res.kl_median:.6f}")
            table.add_row("KL 99th percentile", f"{res.kl_p99:.6f}")
            table.add_row("KL max", f"{res.kl_max:.6f}")
            table.add_row("top-1 agreement", f"{100 * res.top1_agreement:.2f}%")
        Console().print(table)

    _run(go, verbose)


@app.command()
def quantize(
    src: Annotated[str, typer.Argument(help="Source checkpoint directory (bf16, Hugging Face layout) or hub repo id.")],
    out: Annotated[Path, typer.Argument(help="New directory for the INT4 checkpoint.")],
    group_size: Annotated[int, typer.Option(help="Weights per scale: 32, 64 or 128.")] = 128,
    symmetric: Annotated[bool, typer.Option("--symmetric/--asymmetric", help="Zero points or not.")] = True,
    scheme: Annotated[
        str, typer.Option(help="int4 (compressed-tensors pack-quantized) or nf4 (bitsandbytes; group = block size).")
    ] = "int4",
    attention: Annotated[
        bool | None,
        typer.Option(
            "--attention/--no-attention",
            help="Quantize the attention projections too (default with --calibrate: GPTQ keeps their cost small).",
        ),
    ] = None,
    calibrate: Annotated[
        bool,
        typer.Option(
            "--calibrate/--no-calibrate",
            help="GPTQ: fit INT4 to the activations the source model produces on a calibration text (default); "
            "--no-calibrate: each group's plain fit, several times faster, about 2.5x the KL.",
        ),
    ] = True,
    calibration_text: Annotated[
        Path | None, typer.Option(help="UTF-8 text to calibrate on (default: the bundled quant/data/calibration.txt).")
    ] = None,
    calibration_tokens: Annotated[int, typer.Option(help="How many tokens of it the model runs on.")] = 8192,
    no_shared: Annotated[bool, typer.Option("--no-shared", help="Leave the shared expert in bf16.")] = False,
    no_mlp: Annotated[
        bool, typer.Option("--no-mlp", help="Leave the dense MLP layers (Maverick's, between MoE layers) in bf16.")
    ] = False,
    int8_lm_head: Annotated[
        bool,
        typer.Option(
            "--int8-lm-head/--keep-lm-head",
            help="Store the lm_head only in INT8 (blocks of 32), 0.9 GB smaller for Scout, but vLLM cannot serve "
            "that file. Default: keep it as it is, and write it for CPU runs in 6 bits (INT8 with --no-calibrate) "
            "to a file beside it.",
        ),
    ] = False,
    shard_size: Annotated[str, typer.Option(help="Output shard size, e.g. 2GB.")] = "2GB",
    device: Annotated[str, typer.Option(help="Where the quantizer computes: cpu or cuda.")] = "cpu",
    revision: RevisionOpt = None,
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Quantize a checkpoint to INT4 and save it (vLLM can serve the result too).

    Routed and shared experts, attention and the dense MLPs of layers without experts are
    quantized, by GPTQ against the source model's own activations on a calibration text (run
    layer by layer on the CPU); router, norms, embeddings, lm_head and vision stay as they are,
    the lm_head's INT8 blocks beside it for CPU runs (--int8-lm-head: in its place).
    Memory stays bounded: the source is read layer by layer, tensor by tensor. An interrupted
    run keeps the shards it finished; the same command again resumes from them. --scheme nf4
    writes bitsandbytes NF4 instead (its serialization, one linear per expert; no calibration).

    Examples:

      llama4-local quantize ~/models/scout ~/models/scout-int4

      llama4-local quantize ./scout ./scout-int4-g64 --group-size 64 --asymmetric --no-attention

      llama4-local quantize ./scout ./scout-int4 --calibration-text my-chats.txt --calibration-tokens 32768

      llama4-local quantize ./scout ./scout-nf4 --scheme nf4 --group-size 64
    """

    def go():
        _threads(threads)
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        from quant.quantize import QuantizeOptions, keep_freed_memory, quantize_checkpoint
        from quant.resume import work_path

        opts = QuantizeOptions(  # parts None: quant.quantize.default_parts
            group_size=group_size,
            symmetric=symmetric,
            shard_bytes=_parse_size(shard_size),
            device=device,
            scheme=scheme,
            calibrate=calibrate,
            calibration_text=calibration_text,
            calibration_tokens=calibration_tokens,
            int8_lm_head=int8_lm_head,
        )
        keep_freed_memory()
        if attention is not None or no_shared or no_mlp:
            parts = ("experts",) + (() if no_shared else ("shared",)) + (() if no_mlp else ("mlp",))
            opts.parts = parts + (("attention",) if (opts.gptq if attention is None else attention) else ())
        err = Console(stderr=True)
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
        bar = Progress(*columns, TimeRemainingColumn(), console=err)
        task = bar.add_task("quantizing", total=None)

        def progress(done, total, name):
            if not bar.live.is_started:  # only once the input has been checked
                bar.start()
            bar.update(task, completed=done, total=total, description=f"quantizing {name.split('.')[-2][:18]:<18}")

        def stop():  # a bar never started would still end a line: a blank one before an input error
            if bar.live.is_started:
                bar.stop()

        try:
            s = quantize_checkpoint(_model(src, revision), out, opts, progress)
        except KeyboardInterrupt:
            stop()
            work = work_path(out)
            if work.is_dir():
                sys.stderr.write(f"\ninterrupted; finished shards are kept in {work}: run the same command to resume\n")
                raise typer.Exit(130) from None
            raise
        finally:
            stop()
        if s.resumed_shards:
            err.print(f"resumed: {s.resumed_shards} shards were already finished by an earlier run")
        err.print(
            f"wrote {out}: {human(s.source_bytes)} -> {human(s.output_bytes)} "
            f"({s.source_bytes / max(s.output_bytes, 1):.1f}x smaller), "
            f"{s.quantized_linears} {scheme.upper()} linears, {s.shards} shards, {s.seconds:.1f} s"
        )

    _run(go, verbose)


@app.command()
def chat(
    model: ModelOpt,
    revision: RevisionOpt = None,
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", "-n", help="Most tokens per reply (default: 1024).")
    ] = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repetition_penalty: RepetitionOpt = None,
    seed: SeedOpt = None,
    context: SessionContextOpt = None,
    dtype: DtypeOpt = "bfloat16",
    device: DeviceOpt = "auto",
    prefill_chunk: PrefillChunkOpt = 512,
    gpu_memory: GpuMemoryOpt = None,
    host_memory: HostMemoryOpt = None,
    expert_cache_slots: SlotsOpt = None,
    cache_policy: PolicyOpt = "auto",
    miss_policy: MissOpt = "auto",
    prefetch: PrefetchOpt = True,
    vision: VisionOpt = True,
    int8_attention: Int8AttentionOpt = True,
    mmap: MmapOpt = None,
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Talk with the model in the terminal; replies stream as they are generated.

    Type /help inside for commands (/image, /system, /reset, /save, /load, /set, /stats, /exit).
    Ctrl-C stops a reply; Ctrl-D or Ctrl-C at an empty prompt leaves.

    Examples:

      llama4-local chat -m ~/models/Llama-4-Scout-17B-16E-Instruct-int4

      llama4-local chat -m ./scout-int4 --gpu-memory 24GiB --system "Answer briefly."
    """

    def go():
        _threads(threads)
        from llama4_local.chat import ChatSession, run_chat
        from llama4_local.session import ModelSetup

        off = _offload_options(gpu_memory, host_memory, expert_cache_slots, cache_policy, miss_policy, prefetch)
        sampling = _sampling(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        setup = ModelSetup.check(_model(model, revision), sampling, context, vision)
        engine = setup.load(
            dtype,
            device,
            off,
            prefill_chunk,
            cache_entries=1,
            reply_option="max_tokens",
            int8_attention=int8_attention,
            mmap=mmap,
        )
        defaults = setup.defaults
        n = max_tokens if max_tokens is not None else min(defaults.max_new_tokens or 1024, engine.context // 2)
        session = ChatSession(engine, defaults.sampling, n, system)
        raise typer.Exit(run_chat(session))

    _run(go, verbose)


@app.command()
def serve(
    model: ModelOpt,
    revision: RevisionOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free port).")] = 8080,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="LLAMA4_LOCAL_API_KEY", help="Require 'Authorization: Bearer KEY' on every API call."),
    ] = None,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait behind the running one; more get 429.")] = 16,
    max_tokens: Annotated[
        int | None,
        typer.Option("--max-tokens", "-n", help="Reply length when a request names none (default: rest of context)."),
    ] = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repetition_penalty: RepetitionOpt = None,
    seed: SeedOpt = None,
    context: SessionContextOpt = None,
    prompt_cache: Annotated[
        int, typer.Option(help="Recent conversations whose KV cache is kept to skip their prefill (0: off).")
    ] = 4,
    dtype: DtypeOpt = "bfloat16",
    device: DeviceOpt = "auto",
    prefill_chunk: PrefillChunkOpt = 512,
    gpu_memory: GpuMemoryOpt = None,
    host_memory: HostMemoryOpt = None,
    expert_cache_slots: SlotsOpt = None,
    cache_policy: PolicyOpt = "auto",
    miss_policy: MissOpt = "auto",
    prefetch: PrefetchOpt = True,
    vision: VisionOpt = True,
    int8_attention: Int8AttentionOpt = True,
    mmap: MmapOpt = None,
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Serve the model over the OpenAI API (chat completions, completions, tools, JSON output).

    Point any OpenAI client at http://HOST:PORT/v1. Ctrl-C or SIGTERM stops it.

    Examples:

      llama4-local serve -m ~/models/scout-int4

      llama4-local serve -m ./scout-int4 --gpu-memory 24GiB --port 8000

      llama4-local serve -m ./scout-int4 --host 0.0.0.0 --api-key "$(openssl rand -hex 16)"
    """

    def go():
        _threads(threads)
        from llama4_local.server.launch import ServeConfig
        from llama4_local.server.launch import serve as run_server

        off = _offload_options(gpu_memory, host_memory, expert_cache_slots, cache_policy, miss_policy, prefetch)
        sampling = _sampling(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        cfg = ServeConfig(
            model=_model(model, revision),
            model_id=model,
            host=host,
            port=port,
            api_key=api_key,
            max_queue=max_queue,
            dtype=dtype,
            device=device,
            prefill_chunk=prefill_chunk,
            offload=off,
            context=context,
            max_tokens=max_tokens,
            sampling=sampling,
            vision=vision,
            cache_entries=prompt_cache,
            int8_attention=int8_attention,
            mmap=mmap,
        )
        raise typer.Exit(run_server(cfg))

    _run(go, verbose)


@app.command()
def info(
    model: Annotated[
        str | None, typer.Argument(help="Checkpoint directory or hub repo id (or give it with -m, as elsewhere).")
    ] = None,
    model_opt: Annotated[
        str | None, typer.Option("--model", "-m", help="The same as MODEL.", show_default=False)
    ] = None,
    revision: RevisionOpt = None,
    gpu_memory: Annotated[
        str | None,
        typer.Option(
            help="Plan for this much GPU memory, one size or several (24GiB,80GiB); "
            "default: this GPU's free memory, else 24GiB and 80GiB."
        ),
    ] = None,
    context: Annotated[int, typer.Option(help="Context length to reserve KV cache for.")] = 8192,
    host_memory: Annotated[
        str | None,
        typer.Option(
            help="Host RAM for expert copies, one size or several (64GiB,128GiB): a plan for each; "
            "experts beyond it are read from disk (default: as many as this machine's available RAM holds)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Architecture, parameters, quantization, size on disk, and the memory plan of a checkpoint.

    Examples:

      llama4-local info ~/models/scout-int4   (or: llama4-local info -m ~/models/scout-int4)

      llama4-local info ./scout-int4 --gpu-memory 24GiB --context 32768 --json

      llama4-local info ./maverick-int4 --gpu-memory 24GiB --host-memory 64GiB,128GiB,256GiB
    """

    def go():
        from llama4_local.errors import UserError
        from llama4_local.info import model_info
        from llama4_local.loader import check_model_dir

        if context < 1:
            raise UserError(f"--context must be at least 1, not {context}")
        if model and model_opt and model != model_opt:
            raise UserError(f"two models given ({model} and -m {model_opt}); give one")
        if not (model or model_opt):
            raise UserError("which checkpoint? give it as `llama4-local info MODEL` or with -m MODEL")
        path = check_model_dir(_model(model or model_opt, revision))
        if gpu_memory:
            budgets = [_parse_size(g) for g in gpu_memory.split(",")]
        else:
            budgets = [24 * 2**30, 80 * 2**30]
            import importlib.util

            if importlib.util.find_spec("torch"):
                import torch

                if torch.cuda.is_available():
                    budgets = [torch.cuda.mem_get_info()[0] - 2**30]
        hosts = [_parse_size(h) for h in host_memory.split(",")] if host_memory else None
        res = model_info(path, budgets, context, hosts)
        if as_json:
            res = dict(res)
            res["plans"] = [{k: v for k, v in p.items() if k != "rows"} for p in res["plans"]]
            sys.stdout.write(json.dumps(res) + "\n")
            return
        from llama4_local.cli_render import print_info

        print_info(res, path.name)

    _run(go, verbose)


@app.command()
def bench(
    model: ModelOpt,
    revision: RevisionOpt = None,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length (random token ids).")] = 128,
    gen_tokens: Annotated[int, typer.Option(help="Tokens to decode (greedy).")] = 64,
    dtype: DtypeOpt = "bfloat16",
    device: DeviceOpt = "auto",
    prefill_chunk: Annotated[int, typer.Option(help="Prompt tokens per prefill step.")] = 512,
    gpu_memory: GpuMemoryOpt = None,
    host_memory: HostMemoryOpt = None,
    expert_cache_slots: SlotsOpt = None,
    cache_policy: PolicyOpt = "auto",
    miss_policy: MissOpt = "auto",
    prefetch: PrefetchOpt = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    int8_attention: Int8AttentionOpt = True,
    mmap: MmapOpt = None,
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Measure prefill and decode speed, peak memory and the expert cache of one setup.

    Examples:

      llama4-local bench -m ./scout-int4 --gpu-memory 24GiB

      llama4-local bench -m ./scout-int4 --gpu-memory 24GiB --miss-policy swap --no-prefetch --json

      llama4-local bench -m ./small --device cpu --expert-cache-slots 8 --prompt-tokens 64
    """

    def go():
        _threads(threads)
        from llama4_local.bench import BenchRequest, run_bench

        off = _offload_options(gpu_memory, host_memory, expert_cache_slots, cache_policy, miss_policy, prefetch)
        path = _model(model, revision)
        req = BenchRequest(path, prompt_tokens, gen_tokens, dtype, device, prefill_chunk, off, 0, int8_attention, mmap)
        res = run_bench(req)
        if as_json:
            sys.stdout.write(json.dumps(res) + "\n")
            return
        from llama4_local.cli_render import print_bench

        print_bench(res, f"{model} on {res['device']} ({dtype})")

    _run(go, verbose)


def run() -> None:
    """The console entry point: the Typer app, with its usage errors (an option missing,
    malformed or unknown, an unknown command) as one line and exit 2, as every other input
    error; `llama4-local` alone still prints the help. (Typer's click may be its own copy, so
    the errors are known by their class names.)"""
    try:
        code = app(prog_name="llama4-local", standalone_mode=False)  # `python -m cli` too
    except Exception as e:
        kinds = {c.__name__ for c in type(e).__mro__}
        if "NoArgsIsHelpError" in kinds:
            e.show()
        elif "UsageError" in kinds:
            ctx = getattr(e, "ctx", None)
            where = ctx.command_path if ctx else "llama4-local"
            message = " ".join(e.format_message().split())
            sys.stderr.write(f"error: {message} ({where} --help lists the options)\n")
        elif "Abort" in kinds:
            sys.stderr.write("aborted\n")
        else:
            raise
        raise SystemExit(getattr(e, "exit_code", 1)) from None
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    run()
