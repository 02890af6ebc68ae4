"""`drope` command line: parse, load the recipe, call one function per subcommand.

Heavy imports (torch, megatron-core) happen inside the subcommands, so `drope --help` and
`drope config` answer instantly.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import os
import sys
import warnings
from pathlib import Path

import yaml

from drope_megatron import dtypes
from drope_megatron.config import PHASES, ConfigError, load_recipe, raw_recipe, recipe_to_dict

BARS_OFF = "HF_DATASETS_DISABLE_PROGRESS_BARS"  # read by datasets at import, then it has priority
EPILOG = "Overrides are dotted keys: train.lr=1e-4 model.phase=drope model.rope_layers=[0,3]"


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="YAML recipe (recipes/*.yaml); omitted: built-in defaults")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides of recipe keys")


def _split_recipe(args) -> tuple[str | None, list[str]]:
    # `drope config train.lr=1` has no recipe: the first positional is then an override. A key has
    # no `/`, so `sweep/lr=1e-4.yaml` (or an existing file `lr=3.yaml`) stays the recipe.
    first = args.recipe
    if first is not None and "=" in first and "/" not in first.partition("=")[0] and not Path(first).is_file():
        return None, [first, *args.overrides]
    return first, list(args.overrides)


def cmd_config(args) -> int:
    recipe = load_recipe(*_split_recipe(args))
    init = recipe.train.init_from
    if init:
        from drope_megatron.checkpoint import is_checkpoint

        if not is_checkpoint(init):  # the run would build that checkpoint's model, not this one
            print(f"drope: note: train.init_from {init} is not a checkpoint (yet): the model below is the "
                  "recipe's own; once it is, its architecture replaces it", file=sys.stderr)
    ds_json = recipe.train.deepspeed_config
    if ds_json and not Path(ds_json).is_file():  # training refuses it; say so before a job is queued
        print(f"drope: note: train.deepspeed_config {ds_json} is not a file from here ({Path.cwd()}): recipe "
              "paths are read from the folder the command runs in", file=sys.stderr)
    print(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), end="")
    return 0


def cmd_smoke(args) -> int:
    recipe = load_recipe(*_split_recipe(args), resolve_init=False)  # a fresh model of the recipe's own shape
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown or not phases:
        raise ConfigError(f"--phases {args.phases!r}: use a comma-separated list of rope, drope, layers")
    if "layers" in phases and not recipe.model.rope_layers:
        raise ConfigError("--phases has layers: set model.rope_layers, the 0-based layers keeping RoPE")
    if args.steps < 2:
        raise ConfigError("--steps must be at least 2 to see the loss move")
    from drope_megatron import atomic
    from drope_megatron.train.smoke import run_smoke

    result = run_smoke(recipe, phases, args.steps, show_progress=not args.quiet)
    if result["rank"] != 0:
        return 0
    failed = []
    for phase, losses in result["losses"].items():
        print(f"{phase:>7}: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")
        if not losses[-1] < losses[0]:
            failed.append(phase)
    if args.metrics:
        atomic.write_json(args.metrics, result)
    if failed:
        print(f"drope: error: loss did not decrease in phase(s) {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _train_phase(command: str, written: dict, recipe) -> tuple[str, list[str]]:
    """The phase `command` trains, and notes on what the recipe's model section (as `written`)
    asks that does not apply. Notes, not errors: `drope config` prints every key, phase included,
    and its output must feed any command."""
    phase, asked = written.get("phase"), written.get("rope_layers")
    if command == "pretrain":
        trained, notes = "rope", [] if phase in (None, "rope") else [
            f"model.phase={phase} does not apply: drope pretrain trains with RoPE in every layer (drope "
            f"recalibrate without train.init_from trains a model from scratch in phase {phase})"]
    else:  # without RoPE everywhere, or only where model.rope_layers keeps it
        trained = "layers" if recipe.model.phase == "layers" else "drope"
        notes = [] if phase != "rope" else [
            "model.phase=rope does not apply: drope recalibrate trains without RoPE (model.phase=layers keeps it "
            "in model.rope_layers); drope pretrain trains with it"]
    if asked and trained != "layers":
        notes.append(f"model.rope_layers={asked} does not apply: RoPE stays in those layers under model.phase=layers "
                     f"only, and this run trains phase {trained}")
    return trained, notes


def cmd_train(args) -> int:
    path, overrides = _split_recipe(args)
    recipe = load_recipe(path, overrides)
    phase, notes = _train_phase(args.command, raw_recipe(path, overrides).get("model") or {}, recipe)
    from drope_megatron.train.loop import TrainingDiverged, train

    try:
        last = train(recipe, phase, show_progress=not args.quiet, notes=notes)
    except TrainingDiverged as exc:
        print(f"drope: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if last.get("rank") == 0 and last.get("loss") is not None:
        print(f"step {last['step']}: loss {last['loss']:.4f}")
    return 0


def cmd_convert(args) -> int:
    if args.action != "verify" and args.own_process and "torch" not in sys.modules:
        # Conversion runs no model, but megatron-core wraps its fusions in torch.compile at import,
        # which pulls in TorchInductor: 1-3 s of a 1B conversion. Only the `drope` process itself is
        # changed: an in-process caller keeps its compiler and its GPUs.
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
        # Nor does it need a GPU: on a GPU host, CUDA's context and NCCL cost seconds and host memory.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.action == "hf-to-megatron":
        from drope_megatron.convert.hf_to_megatron import convert

        dst = convert(args.src, args.dst, tp=args.tp, pp=args.pp, dtype=args.dtype, overwrite=args.overwrite,
                      allow_sliding_window=args.ignore_sliding_window, show_progress=not args.quiet)
        print(f"wrote Megatron checkpoint {dst} (loads at any TP dividing its query groups, any PP)")
        return 0
    if args.action == "megatron-to-hf":
        from drope_megatron.convert.megatron_to_hf import export

        print(export(args.src, args.dst, arch=args.arch, dtype=args.dtype, overwrite=args.overwrite,
                     max_shard_bytes=int(args.max_shard_gib * 2**30), show_progress=not args.quiet))
        return 0
    from drope_megatron.convert.verify import verify

    try:
        result = verify(args.hf, args.megatron, tp=args.tp, pp=args.pp, batch=args.batch, length=args.length,
                        seed=args.seed, dtype=args.dtype, report=args.report)
    except ConfigError as exc:
        raise exc.renamed({"parallel.tensor_model_parallel_size": "--tp",
                           "parallel.pipeline_model_parallel_size": "--pp"}) from None
    if result is None:  # not the rank that compares
        return 0
    print(f"max |diff| {result['max_abs_diff']:.3e}  mean |diff| {result['mean_abs_diff']:.3e}  "
          f"top-1 agreement {result['top1_agreement']:.4f}  ({result['tokens']} tokens, {result['dtype']})")
    if not result["max_abs_diff"] <= args.atol:  # NaN logits fail too
        print(f"drope: error: logits differ by {result['max_abs_diff']:.3e} > --atol {args.atol}", file=sys.stderr)
        return 1
    return 0


def _depths(text: str | None) -> list[float] | None:
    try:
        return [float(d) for d in _csv(text)] if text else None
    except ValueError:
        raise ConfigError(f"--depths {text!r}: use comma-separated fractions, e.g. 0,0.5,1") from None


def cmd_eval(args) -> int:
    import dataclasses

    from drope_megatron.config import Recipe

    e = load_recipe(args.recipe, resolve_init=False).eval if args.recipe else Recipe().eval
    flags = {"lengths": _csv(args.lengths), "tasks": _csv(args.tasks), "baselines": _csv(args.baselines),
             "data": args.data, "text_key": args.text_key, "documents": args.documents, "seed": args.seed,
             "depths": _depths(args.depths), "samples": args.samples}
    given = {k: v for k, v in flags.items() if v is not None}
    _check_data_words(args.data or [])
    # An error about a value given as a flag names the flag; the recipe's own keys keep their names.
    names = {"parallel.tensor_model_parallel_size": "--tp",
             **{f"eval.{k}": "--" + k.replace("_", "-") for k in given}}
    try:
        return _eval(args, dataclasses.replace(e, **given))
    except ConfigError as exc:
        raise exc.renamed(names) from None


def _check_data_words(words: list[str]) -> None:
    """--data takes every word up to the next option: a model named after it would be read as data."""
    for word in words:
        if Path(word).is_dir() or ("=" in word and not Path(word).exists() and not glob.has_magic(word)):
            raise ConfigError(f"--data {word!r} is not a data file: --data takes every word up to the next "
                              "option, so name the models before it")


def _eval(args, e) -> int:
    from drope_megatron.config import Recipe, validate

    from drope_megatron.eval.scaling import BASELINES

    bad = [b for b in e.baselines if b not in BASELINES]
    if bad:
        raise ConfigError(f"--baselines has {bad[0]!r}: use {', '.join(BASELINES)}")
    validate(Recipe(eval=e))
    from drope_megatron.eval.runner import parse_models, run

    models = parse_models(args.models)
    results = run(models, e, args.out, overwrite=args.overwrite, tp=args.tp, dtype=args.dtype,
                  progress=not args.quiet)
    if results is not None:
        print((args.out / "report.md").read_text(), end="")
        print(f"wrote {args.out}/report.md, results.json and plots")
    return 0


def cmd_demo(args) -> int:
    from drope_megatron.demo.pipeline import Demo

    demo = Demo(work=args.work, pretrain=args.pretrain, smoke=args.smoke, until=args.until, overrides=args.overrides)
    if args.recipe:
        demo.recipe = Path(args.recipe)
    report = demo.run()  # a failed stage's status (3: the training diverged) is the demo's: see main
    if report is None:
        print(f"[demo] stopped after {args.until}: {args.work}")
    else:
        print(report.read_text(), end="")
        print(f"[demo] done: {report}")
    return 0


def _add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the whole story on a CPU: RoPE model, drop RoPE, recalibrate, evaluate, export",
                       description="Run the embedded demo as resumable stages in --work (corpus, data, rope, drope, "
                                   "eval, export, report); finished stages are reused.", epilog=EPILOG)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="recipe overrides: eval.* for the evaluation, the rest for the recalibration")
    p.add_argument("--work", type=Path, default=Path("runs/demo"), help="work folder (default runs/demo)")
    p.add_argument("--recipe", help="recalibration + evaluation recipe (default recipes/demo-cpu.yaml)")
    p.add_argument("--pretrain", action="store_true",
                   help="pretrain the RoPE model here (recipes/demo-pretrain.yaml) instead of the shipped one")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps: checks every stage runs")
    p.add_argument("--until", default="report", help="stop after this stage")
    p.set_defaults(func=cmd_demo)


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


def _add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity by length, passkey and needle retrieval, RoPE-scaling baselines",
                       description="Evaluate Megatron checkpoints and Hugging Face folders at several lengths "
                                   "(multiples of each model's training context, or tokens). RoPE models are "
                                   "also run with each --baselines scaling. Writes results.json, report.md and "
                                   "PNG plots to --out. Launch TP processes with torchrun for --tp > 1.")
    p.add_argument("models", nargs="+", metavar="[LABEL=]MODEL", help="Megatron checkpoints or HF folders")
    p.add_argument("--out", type=Path, required=True, help="report folder (written whole, atomically)")
    p.add_argument("--recipe", help="YAML recipe whose eval section gives the defaults")
    p.add_argument("--lengths", help="comma-separated, e.g. 1x,2x,4x,8x or 2048,8192 (default 1x,2x,4x,8x)")
    p.add_argument("--tasks", help="comma-separated: ppl, passkey, niah or single RULER tasks (default ppl)")
    p.add_argument("--baselines", help="comma-separated RoPE scalings for RoPE models: pi, ntk, yarn")
    p.add_argument("--data", nargs="+", help="held-out long documents for ppl (text, json/jsonl, parquet files)")
    p.add_argument("--text-key", help="text column of json/parquet documents (default text)")
    p.add_argument("--documents", type=int, help="documents per length for ppl (default 8)")
    p.add_argument("--depths", help="needle depths, comma-separated fractions (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--samples", type=int, help="retrieval prompts per task, length and depth (default 4)")
    p.add_argument("--seed", type=int, help="prompt seed (default 0)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size for Megatron checkpoints")
    p.add_argument("--dtype", choices=dtypes.NAMES, help="compute dtype (default: the model's)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)


def _add_io_args(p: argparse.ArgumentParser, default_dtype: str) -> None:
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--dtype", choices=["auto", *dtypes.NAMES], default="auto", help=f"output dtype (auto: {default_dtype})")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_convert_parsers(sub) -> None:
    conv = sub.add_parser("convert", help="move weights between Hugging Face and Megatron formats",
                          description="Conversion between Hugging Face folders and Megatron checkpoints.")
    actions = conv.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("hf-to-megatron", help="Hugging Face folder -> Megatron dist checkpoint",
                           description="Stream a local Hugging Face folder (config.json + safetensors) into a "
                                       "megatron-core dist checkpoint with metadata and tokenizer files. It loads "
                                       "at any TP/PP; --tp fixes the vocabulary padding and is validated now.")
    _add_io_args(p, "the weights' own dtype")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to pad and validate for (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to validate for (default 1)")
    p.add_argument("--ignore-sliding-window", action="store_true",
                   help="convert a sliding-window model to full attention (changes the function past the window)")
    p = actions.add_parser("megatron-to-hf", help="Megatron checkpoint -> Hugging Face folder",
                           description="Write a Hugging Face folder: the source architecture for a RoPE model, "
                                       "a stock SmolLM3ForCausalLM with NoPE layers for a DroPE model.")
    _add_io_args(p, "the checkpoint's dtype")
    p.add_argument("--arch", choices=["auto", "source", "nope"], default="auto",
                   help="auto: source for phase rope, nope otherwise")
    p.add_argument("--max-shard-gib", type=float, default=5.0,
                   help="largest safetensors shard (default 5 GiB); tensors stream into it, so its size "
                        "costs no memory")
    p = actions.add_parser("verify", help="compare logits of a Hugging Face model and a Megatron checkpoint",
                           description="Run both on the same random tokens; print max/mean |logit diff| and top-1 "
                                       "agreement; exit 1 above --atol. At TP/PP > 1 launch TP*PP processes.")
    p.add_argument("hf", type=Path)
    p.add_argument("megatron", type=Path)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=dtypes.NAMES, default="float32", help="compute dtype of both models")
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--report", type=Path, help="also write the numbers as JSON")
    conv.set_defaults(func=cmd_convert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drope",
        description="DroPE on megatron-core: pretrain with RoPE, drop it, recalibrate, evaluate long context.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("config", help="validate a recipe and print it fully resolved",
                       description="Load a recipe with overrides, validate it, print the result as YAML.",
                       epilog=EPILOG)
    _add_recipe_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("smoke", help="smallest end-to-end check: train a few steps in each phase",
                       description="Build the recipe's model and train it a few AdamW steps on one fixed "
                                   "batch in each positional phase, switching phase on the same instance. "
                                   "Exits 1 unless the loss falls in every phase. Runs on one process or "
                                   "under torchrun/srun/mpirun with world size = TP.",
                       epilog=EPILOG)
    _add_recipe_args(p)
    p.add_argument("--phases", default="rope,drope", help="comma-separated phases in order (rope,drope,layers)")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per phase (default 5)")
    p.add_argument("--metrics", help="write the losses and gradient norms as JSON to this path (rank 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_smoke)
    for name, text in (("pretrain", "train from scratch with RoPE (small models, the demo)"),
                       ("recalibrate", "drop RoPE and recalibrate at the original context")):
        p = sub.add_parser(name, help=text, epilog=EPILOG,
                           description=f"{text[0].upper()}{text[1:]}: the megatron-core model in a DeepSpeed engine "
                                       "(ZeRO stage and offload from the recipe), on packed data, with resumable "
                                       "checkpoints in train.save_dir. Launch with torchrun/srun/mpirun for "
                                       "several processes.")
        _add_recipe_args(p)
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.set_defaults(func=cmd_train)
    _add_convert_parsers(sub)
    _add_eval_parser(sub)
    _add_demo_parser(sub)
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line; `key=value` words after an option (`--steps 3 train.lr=1e-3`) join the
    command's trailing list (overrides, or eval's models), which argparse alone ends at the option."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    trailing = next((name for name in ("overrides", "models") if isinstance(getattr(args, name, None), list)), None)
    # An override is key=value; a model may be a bare path.
    if extra and (trailing is None or any(word.startswith("-") or ("=" not in word and trailing == "overrides")
                                          for word in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        setattr(args, trailing, [*getattr(args, trailing), *extra])
    return args


def quiet_library_warnings() -> None:
    """Silence the libraries' warnings that say nothing to act on (the `drope` command and tools/)."""
    # megatron-core announces at import that Apex / Transformer Engine are absent: expected here.
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*")
    warnings.filterwarnings("ignore", message="full scope is deprecated")
    # torch's distributed checkpoint warns about its own API churn on every megatron-core load.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*(DTensor instead|`load_state_dict` is dep)")


def main(argv: list[str] | None = None, own_process: bool = False) -> int:
    """The `drope` command in this process; `own_process`: the process is the command's alone."""
    quiet_library_warnings()
    args = parse(argv)
    args.own_process = own_process
    try:
        with _datasets_quiet(getattr(args, "quiet", False), own_process):
            return args.func(args)
    except ConfigError as exc:
        print(f"drope: error: {exc}", file=sys.stderr)
        return exc.exit_code


@contextlib.contextmanager
def _datasets_quiet(quiet: bool, own_process: bool):
    """datasets' own progress bars off for the call. The `drope` process sets the variable datasets
    reads at import (and imports nothing for it); an in-process caller gets its setting back
    through datasets' API, since datasets reads the variable once and then lets it win."""
    if not quiet:
        yield
        return
    if own_process:
        os.environ[BARS_OFF] = "1"
        yield
        return
    import datasets

    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def run(argv: list[str] | None = None) -> None:
    """The `drope` command: `main`, then a quick exit."""
    code = main(argv, own_process=True)
    # Shutdown would walk every object torch, megatron-core and transformers made (about 1 s per
    # process); the operating system frees them anyway. Only here: an in-process `main` keeps GC.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
