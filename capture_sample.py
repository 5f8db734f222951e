"""Generate an image with FLUX.1 and capture what every transformer block produced at every step.

    uv run python capture_sample.py --prompt "a beautiful landscape"
    uv run python capture_sample.py --model flux-tiny --prompt "a red cube" --seed 1   # no GPU, no download
    uv run python capture_sample.py decode output/intermediates/capture_..._flux-schnell.pt
    uv run python capture_sample.py analyze output/intermediates/capture_..._flux-schnell.pt
    uv run python capture_sample.py sweep output/intermediates/capture_..._flux-schnell.pt --intervention skip
    uv run python capture_sample.py attention output/intermediates/capture_..._flux-schnell.pt --tokens sky

Run with --help for every flag. The library behind this lives in `flux/`.
"""

import difflib
import functools
import importlib
import inspect
import re
import sys
import time
import typing

import fire
import torch
import tqdm

from flux.errors import UsageError, UserError
from flux.interrupts import raising_interrupts


def main(
    model: str = "flux-schnell",
    prompt: str = "a beautiful landscape",
    width: int = 256,
    height: int = 256,
    seed: int | None = None,
    num_steps: int | None = None,
    guidance: float | None = None,
    offload: bool = False,
    device: str | None = None,
    output_dir: str = "output",
    capture: bool = True,
    format: str = "pt",
    blocks: str | None = None,
    steps: str | None = None,
    streams: str = "both",
    capture_dtype: str | None = None,
    force: bool = False,
    should_decode_intermediates: bool = True,
    decode_target: str = "x0",
    decode_batch_size: int | None = None,
    compile_decoder: bool | None = None,
    analyze: bool = False,
    weights_dir: str | None = None,
    progress: bool = True,
):
    """Generate one image and capture every double- and single-stream block output at every step.

    Writes output_dir/img_{n}.jpg (n = next free index), and with capture
    output_dir/intermediates/capture_{YYYYmmdd_HHMMSS}_{model}.pt (or a directory with --format safetensors)
    plus metadata_{YYYYmmdd_HHMMSS}_{model}.json. Nothing is ever overwritten.

    Work on a saved capture with the subcommands `decode` (the lens), `analyze` (metrics and plots), `replay`
    (re-run with interventions), `sweep` (alter each block in turn) and `attention` (where the image reads
    each word of the prompt): `capture_sample.py decode --help`.

    Args:
        model: flux-schnell (default; 4 steps), flux-dev, flux-dev-krea (50 steps, gated on the hub), or
            flux-tiny (a toy model of the same architecture generated locally; no GPU or download needed).
        prompt: The text prompt.
        width: Image width in pixels, a positive multiple of 16 (default 256).
        height: Image height in pixels, a positive multiple of 16 (default 256).
        seed: Noise seed; random when omitted (the one used is recorded in the metadata).
        num_steps: Denoising steps; default 4 for flux-schnell and flux-tiny, 50 for dev/Krea.
        guidance: Distilled guidance for dev/Krea (default 2.5; flux-tiny 3.5); flux-schnell has no guidance
            input, so there it warns and is ignored.
        offload: Keep models on the CPU and move each to the GPU only while it runs (less GPU memory).
        device: Torch device; cuda when available, else cpu.
        output_dir: Folder for all outputs (default "output").
        capture: Capture block outputs (default True). False runs plain generation with no hooks (the
            capture and lens flags are then refused, as they would not apply).
        format: pt (default; one file, held in memory until the end) or safetensors (a directory with one
            shard per step, streamed to disk by a background thread; use it for big runs).
        blocks: Which blocks to capture, e.g. "double:0-5,single:10,37" (default: all; a range after a
            comma keeps the kind before it).
        steps: Which steps to capture, e.g. "0,3", "0-49:5" (start-stop:stride) (default: all).
        streams: Tokens to keep from each block output: both (default), img or txt.
        capture_dtype: bf16, fp16 or fp32 for captured block outputs; default: the model's dtype
            (bf16 for the published models, fp32 for flux-tiny). fp16 stores the published models'
            largest activations (over 65504) as inf.
        force: Capture even when the estimated size exceeds the free disk space (or, for .pt, the host
            memory).
        should_decode_intermediates: Decode every captured block output as if it were the last (the lens),
            writing JPEGs and labelled grids under intermediates/decoded/ (default True). With False, the
            lens flags are refused; `capture_sample.py decode CAPTURE` takes them later.
        decode_target: What the lens shows: x0 (default; the clean image each block predicts) or next (the
            latent one Euler step later).
        decode_batch_size: Images per VAE decoder call in the lens; default: set by the image size within
            the free GPU memory (on CPU 8, fewer where half the RAM cannot hold 8). 1 decodes one at a time.
        compile_decoder: torch.compile the VAE decoder for the lens; default: on CUDA when eager decoding
            would take over a minute (the compiled graph is cached on disk, so only the first run per image
            size pays ~30 s), never on CPU.
        analyze: After the capture, write metrics, heatmaps, norm plots and an animation (needs the analysis
            extra); the same as running the `analyze` command on the capture.
        weights_dir: A local directory laid out like the model's hub repo, or "hub" to force the Hugging Face
            cache; either overrides FLUX_MODEL/FLUX_AE/FLUX_TEXT_ENCODERS (a folder without the text
            encoders leaves them to FLUX_TEXT_ENCODERS); by default those variables if set, else the HF
            cache.
        progress: Show progress bars (default True).
    """
    flags = dict(locals())  # every flag, by the names RunOptions has (a test keeps the defaults alike)
    from flux.pipeline import RunOptions, buffers_while_loading, generate, load_models
    from flux.store import human_bytes

    progress = flags.pop("progress")
    opts = RunOptions(**flags).validate()
    for warning in opts.warnings:
        print(warning, file=sys.stderr)
    if opts.capture:
        size = opts.estimated_capture_bytes()
        print(f"Estimated capture size: {human_bytes(size)} ({opts.format})", file=sys.stderr)
    where = str(opts.device)
    if opts.offload and torch.device(opts.device).type != "cpu":
        where = f"the CPU, each moved to {opts.device} while it runs"
    print(f"Loading {opts.spec.name} (flow model, autoencoder, T5, CLIP) on {where}...", file=sys.stderr)
    started = time.perf_counter()
    buffers = buffers_while_loading(opts)  # the capture's host buffers, pinned while the models load
    models = load_models(opts.spec, opts.device, opts.offload, opts.weights_dir, progress=progress)
    print(f"Models loaded in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    result = generate(models, opts, progress=progress, buffers=buffers)
    print(f"Image:    {result.image_path}")
    if opts.seed is None and result.metadata_path is None:  # nothing else records the random seed
        print(f"Seed:     {result.metadata['seed']} (drawn at random: pass --seed to repeat this run)")
    if result.capture_path is not None:
        print(f"Capture:  {result.capture_path}")
        print(f"Metadata: {result.metadata_path}")
    if result.decoded_dir is not None:
        print(f"Lens:     {result.decoded_dir}")
    if opts.analyze and result.capture_path is not None:
        from flux.analysis import analyze_command

        analyze_command(
            str(result.capture_path), device=opts.device, weights_dir=opts.weights_dir, progress=progress
        )


def decode(
    path: str,
    output_dir: str | None = None,
    decode_target: str = "x0",
    device: str | None = None,
    decode_batch_size: int | None = None,
    compile_decoder: bool | None = None,
    weights_dir: str | None = None,
    blocks: str | None = None,
    steps: str | None = None,
    progress: bool = True,
):
    """Decode a saved capture with the lens, without sampling again.

    Loads only the flow checkpoint's final_layer tensors and the AE; when the checkpoint is neither local
    nor in the Hugging Face cache, those tensors alone are fetched from the hub by range requests. Writes
    {capture folder}/decoded/{capture stem}/{double,single}_block_{i}_step_{k}.jpg and
    grid_{double,single}.jpg.

    Args:
        path: A capture: a .pt file or a safetensors capture directory.
        output_dir: Where to write; default {capture folder}/decoded/{capture stem}. A folder that exists,
            given or default, is never written into; _1, _2, ... is added to its name.
        decode_target: x0 (default; each block's clean-image estimate) or next (the one-step latent).
        device: Torch device; cuda when available, else cpu.
        decode_batch_size: Images per decoder call; default: set by the image size (on CPU 8, fewer where
            half the RAM cannot hold 8).
        compile_decoder: torch.compile the decoder; default: on CUDA where it pays, never on CPU.
        weights_dir: A local directory laid out like the model's hub repo, or "hub"; default as for capture.
        blocks: Only these captured blocks, e.g. "double:0-5,single:10,single:37" (default: all captured).
        steps: Only these captured steps, e.g. "0,3" or "0-49:5" (default: all captured).
        progress: Show a progress bar over decoded images (default True).
    """
    from flux.pipeline import decode_later

    decode_later(
        path, output_dir, target=decode_target, device=device, batch_size=decode_batch_size,
        compile=compile_decoder, weights_dir=weights_dir, blocks=blocks, steps=steps, progress=progress,
    )  # fmt: skip


# Subcommands, imported only when used: `capture_sample.py NAME ...`.
COMMANDS = {
    "decode": "capture_sample:decode",
    "analyze": "flux.analysis:analyze_command",
    "replay": "flux.sweep:replay_command",
    "sweep": "flux.sweep:sweep_command",
    "attention": "flux.attention:attention_command",
}


def _kinds(command) -> dict[str, set[str]]:
    """The command's parameters by annotated kind: "text" (`str`, `str | None`), "switch" (`bool`,
    `bool | None`), "number" (the rest), and "optional" (those that take None)."""
    hints = typing.get_type_hints(command)
    hints.pop("return", None)
    kinds: dict[str, set[str]] = {"text": set(), "switch": set(), "number": set(), "optional": set()}
    for param, hint in hints.items():
        types = set(typing.get_args(hint)) or {hint}
        kind = "text" if types - {type(None)} == {str} else "switch" if bool in types else "number"
        kinds[kind].add(param)
        if type(None) in types:
            kinds["optional"].add(param)
    return kinds


def long_flags(command, args: list[str], name: str) -> list[str]:
    """Fire also takes `-name` for `--name` and `-x` for the one flag that starts with x; spell every flag out
    as `--name` so the checks below see them all. `-h` is help (Fire would read it as --height). A word
    after a text flag is that flag's value (`--prompt -h` is a prompt), as keep_text hands it on; after a
    number flag it is joined to it (`--guidance -inf` -> `--guidance=-inf`), so validation names the value."""
    kinds = _kinds(command)
    params = inspect.signature(command).parameters
    # Fire's help offers `-x` for the one flag (a parameter with a default) that starts with x; a positional
    # (`path`) that starts with x too does not make it ambiguous.
    flags = [p for p, param in params.items() if param.default is not param.empty]
    text, numbers = kinds["text"], kinds["number"]
    out = []
    for i, token in enumerate(args):
        if token == "--":
            return out + args[i:]
        previous = out[-1] if out else ""
        flag = previous[2:].replace("-", "_") if previous.startswith("--") and "=" not in previous else None
        if not re.match(r"-[A-Za-z]", token) or flag in text:
            out.append(token)
        elif flag in numbers and token != "-h":
            out[-1] = f"{previous}={token}"
        else:
            key, eq, value = token[1:].partition("=")
            if key == "h" and not eq:
                key = "help"
            elif len(key) == 1:
                matches = [p for p in flags if p.startswith(key)] or [p for p in params if p.startswith(key)]
                if len(matches) > 1:
                    raise UsageError(f"{name}: -{key} could be --{', --'.join(matches)}; spell the flag out.")
                key = matches[0] if matches else key
            out.append(f"--{key}{eq}{value}")
    return out


def _flag_names(args: list[str]) -> list[str]:
    """The flags named in `args` (`--name`, `--name=value`, `--no-name`), up to Fire's own `--` separator."""
    names = []
    for token in args:
        if token == "--":
            break
        if token.startswith("--") and len(token) > 2:
            names.append(token[2:].split("=", 1)[0].replace("-", "_"))
    return names


def check_flags(command, args: list[str], name: str) -> None:
    """Refuse a flag the command does not have, before it runs: Fire would call the command with the flags it
    knows and only complain about the rest afterwards, so a typo would cost a whole run."""
    known = set(inspect.signature(command).parameters)
    for flag in _flag_names(args):
        if flag == "help" or flag in known or (flag.startswith("no") and flag[2:] in known):
            continue
        close = difflib.get_close_matches(flag, known, n=1)
        hint = f" Did you mean --{close[0]}?" if close else ""
        raise UsageError(f"{name} has no flag --{flag}.{hint} `{name} --help` lists them.")


def keep_text(command, args: list[str]) -> list[str]:
    """Fire reads every value as a Python literal, so `--prompt 1984` would arrive as an int and
    `--prompt "[cat, dog]"` as a list. Hand Fire the values of text flags as quoted literals instead, so they
    arrive exactly as typed."""
    kinds = _kinds(command)
    text, optional = kinds["text"], kinds["optional"]
    out, i = [], 0

    def literal(flag: str, value: str) -> str:
        # `None` keeps its meaning (the default) where the flag allows it; `--prompt None` is a prompt.
        return value if value == "None" and flag in optional else repr(value)

    while i < len(args):
        token = args[i]
        if token == "--":
            return out + args[i:]
        name, eq, value = token[2:].partition("=")
        flag = name.replace("-", "_")
        if token.startswith("--") and flag in text:
            if eq:
                out.append(f"--{name}={literal(flag, value)}")
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):  # else the flag has no value
                out += [token, literal(flag, args[i + 1])]
                i += 1
            else:
                out.append(token)
        else:
            out.append(token)
        i += 1
    return out


def checked(command, name: str):
    """`command` for Fire, with every switch checked to be a boolean before the body runs (Fire turns
    `--flag maybe` into the string 'maybe', which is truthy)."""
    switches = _kinds(command)["switch"]
    signature = inspect.signature(command)

    @functools.wraps(command)
    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        for flag, value in bound.arguments.items():
            if flag in switches and value is not None and not isinstance(value, bool):
                raise UsageError(f"{name}: --{flag} is a switch: pass --{flag} or --no{flag}; got {value!r}.")
        return command(*args, **kwargs)

    return call


# What helps when a command runs out of GPU memory: only flags that command has.
OUT_OF_MEMORY = {
    "": "Try --offload if it is not on (models visit the GPU one at a time), a smaller --width/--height, a "
    "smaller --decode_batch_size, capturing less (--blocks, --steps, --streams img), or, for the lens of a "
    "saved capture, `decode CAPTURE --device cpu`.",
    "decode": "Try a smaller --decode_batch_size (1 decodes one image at a time), or --device cpu.",
    "analyze": "Try --device cpu.",
    "replay": "A replay holds the flow model and the autoencoder on the GPU, and decodes beside them: try "
    "--offload (the flow model leaves the GPU before the image is decoded), a GPU with more memory, or "
    "--device cpu (slow).",
    "attention": "The replay holds the flow model and the autoencoder on the GPU: try --offload (the flow "
    "model leaves the GPU before the image is decoded), a GPU with more memory, or --device cpu (slow).",
    "sweep": "A sweep holds the flow model and the autoencoder on the GPU, and decodes beside them: try "
    "--offload (the flow model leaves the GPU before each image is decoded), a GPU with more memory, or "
    "--device cpu (slow); a sweep that stopped goes on with --resume.",
}


def help_text(command, name: str) -> str:
    """Fire's help screen for `command`, for stdout (Fire writes it to stderr, where `--help | less` misses
    it), without offering `-h` for --height: `-h` means help."""
    from fire import helptext, trace

    text = helptext.HelpText(checked(command, name), trace=trace.FireTrace(command, name=name))
    # Fire quotes a name with a space in it ('capture_sample.py sweep'), which reads as one word to type.
    return text.replace("-h, --height", "--height").replace(f"'{name}'", name)


def run(argv: list[str] | None = None) -> int:
    """Entry point: dispatch subcommands, turn user errors into one paragraph and an exit code."""
    argv = sys.argv[1:] if argv is None else argv
    # No tqdm monitor thread (it only retunes bars that stall): it takes the bars' lock every 10 s, and
    # closing the last bar joins it while holding that lock. A Ctrl-C inside a bar's refresh, which takes
    # the lock without a try/finally, would leave it taken and the two threads waiting for each other.
    tqdm.tqdm.monitor_interval = 0
    with raising_interrupts():  # Ctrl-C and SIGTERM: KeyboardInterrupt, never inside a held lock
        return _run(argv)


def _run(argv: list[str]) -> int:
    try:
        if argv and argv[0] in COMMANDS:
            module, _, func = COMMANDS[argv[0]].partition(":")
            command, args = getattr(importlib.import_module(module), func), argv[1:]
            name = f"capture_sample.py {argv[0]}"
        else:
            command, args, name = main, argv, "capture_sample.py"
            close = difflib.get_close_matches(args[0], COMMANDS, n=1) if args else []
            if close and not args[0].startswith("-"):
                raise UsageError(
                    f"{args[0]!r} is not a command. Did you mean `capture_sample.py {close[0]}`?"
                )
        args = keep_text(command, long_flags(command, args, name))
        # Help is help wherever it stands: Fire would first call the command with the other flags (a whole
        # run). A text flag's value arrives quoted, so `--prompt=--help` and `--prompt -h` stay prompts.
        if any(arg == "--help" or arg.startswith("--help=") for arg in args):
            print(help_text(command, name))
            return 0
        check_flags(command, args, name)
        fire.Fire(checked(command, name), args, name=name)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except torch.cuda.OutOfMemoryError as e:
        what = OUT_OF_MEMORY.get(argv[0] if argv and argv[0] in COMMANDS else "", OUT_OF_MEMORY[""])
        print(f"error: the GPU ran out of memory. {what} ({' '.join(str(e).split())[:200]})", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print("Stopped.", file=sys.stderr)
        return 143 if str(e).startswith("signal") else 130
    return 0


if __name__ == "__main__":
    sys.exit(run())
