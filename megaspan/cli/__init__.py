"""The ``megaspan`` command line: ``train``, ``info`` and the data subcommands.

Heavy modules (torch, megatron.core) are imported inside the commands so ``megaspan --help``
stays fast. User errors (bad config, bad data, unavailable backend) print ONE line,
``megaspan: error: <message>``, and exit 2 without writing anything; any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import warnings
from collections.abc import Sequence

EXIT_USAGE = 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is a complete one-line explanation for the user."""
    from megaspan.config.loader import ConfigError
    from megaspan.data import DataError

    errors: list[type[BaseException]] = [ConfigError, DataError]
    from megaspan.errors import BackendError  # torch-free (megaspan.specs moved to megaspan.models)

    errors.append(BackendError)
    return tuple(errors)


def _quiet_expected_backend_notices() -> None:
    """Drop import-time notices that only restate the environment.

    Megatron warns on import that Transformer Engine/Apex are missing and torch logs that no
    CUDA runtime exists; on CPU machines both are expected (``megaspan info`` reports the
    backends), and they would bury the one-line error of a bad input.
    """
    warnings.filterwarnings("ignore", message=r"(Transformer Engine and )?Apex (is|are) not installed")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def _fail(message: str) -> int:
    print(f"megaspan: error: {' '.join(str(message).split())}", file=sys.stderr)
    return EXIT_USAGE


# ---- train ----------------------------------------------------------------------------------


def _add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train (or resume) a model",
        description="Train a model. Settings come from the defaults, then --config, then "
        "dotted overrides such as model.num_layers=24 optimizer.lr=3e-4.",
    )
    p.add_argument("--config", metavar="RECIPE", default="default",
                   help="YAML recipe: a path or a shipped name (default, tiny); default: default")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and print the resolved config, then exit without training")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from megaspan.config.loader import config_to_dict, load_config
    from megaspan.config.validate import validate
    from megaspan.runtime.distributed import env_from_launcher

    cfg = load_config(args.config, args.overrides)
    validate(cfg, env_from_launcher().world_size)
    from megaspan.training.setup import check_schedule

    check_schedule(cfg)
    if args.dry_run:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    from megaspan.training.trainer import train

    return train(cfg)


# ---- info -----------------------------------------------------------------------------------


def _version(module: str) -> str:
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return "not installed"
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - a broken install is information, not a crash
        return f"unavailable ({type(exc).__name__})"
    return str(getattr(mod, "__version__", "unknown"))


def _cmd_info(args: argparse.Namespace) -> int:
    import platform

    import torch

    import megaspan
    from megaspan.norms import available

    if torch.cuda.is_available():
        device = f"cuda x{torch.cuda.device_count()} ({torch.cuda.get_device_name()})"
    else:
        device = f"cpu ({torch.get_num_threads()} threads)"
    print(f"megaspan             {megaspan.__version__}")
    print(f"python               {platform.python_version()}")
    print(f"torch                {torch.__version__}")
    print(f"megatron-core        {_mcore_version()}")
    print(f"transformer-engine   {_version('transformer_engine')}")
    print(f"device               {device}")
    print("norm placements:")
    for name, cls in available().items():
        print(f"  {name:<12} {getattr(cls, 'description', '')}")
    return 0


def _mcore_version() -> str:
    try:
        from importlib.metadata import version

        return version("megatron-core")
    except Exception:  # noqa: BLE001
        return "not installed"


def _add_info(subparsers) -> None:
    p = subparsers.add_parser("info", help="versions, device and registered norm placements")
    p.set_defaults(func=_cmd_info)


# ---- parser ---------------------------------------------------------------------------------


def _add_data_commands(subparsers) -> None:
    """The data engineer's ``tokenizer``/``preprocess`` subcommands, when that module exists."""
    if importlib.util.find_spec("megaspan.data.commands") is None:
        return
    from megaspan.data.commands import register

    register(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megaspan",
        description="Megatron-Core training for deep Transformers with selectable norm placements.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(subparsers)
    _add_info(subparsers)
    _add_data_commands(subparsers)
    from megaspan.cli import plan

    plan.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_expected_backend_notices()
    try:
        return args.func(args)
    except _user_errors() as exc:
        return _fail(str(exc))


if __name__ == "__main__":
    sys.exit(main())
