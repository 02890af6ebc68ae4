"""`drope` command line: parse, load the recipe, call one function per subcommand.

Heavy imports (torch, megatron-core) happen inside the subcommands, so `drope --help` and
`drope config` answer instantly.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from drope_megatron.config import PHASES, ConfigError, load_recipe, recipe_to_dict

EPILOG = "Overrides are dotted keys: train.lr=1e-4 model.phase=drope model.rope_layers=[0,3]"


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="YAML recipe (recipes/*.yaml); omitted: built-in defaults")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides of recipe keys")


def _split_recipe(args) -> tuple[str | None, list[str]]:
    # `drope config train.lr=1` has no recipe: the first positional is then an override.
    if args.recipe is not None and "=" in args.recipe:
        return None, [args.recipe, *args.overrides]
    return args.recipe, list(args.overrides)


def cmd_config(args) -> int:
    recipe = load_recipe(*_split_recipe(args))
    print(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), end="")
    return 0


def cmd_smoke(args) -> int:
    recipe = load_recipe(*_split_recipe(args))
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
    p.add_argument("--metrics", help="write the losses as JSON to this path (rank 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_smoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"drope: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
