"""The stages' command lines, one style for all. Every job in ``jobs/`` is a typer command: its options
are typed once in its signature and its examples are in its docstring, and ``python -m jobs.X``,
``ray job submit -- python -m jobs.X`` and ``bundlerec X`` run that same command. Config-driven stages
take ``--config FILE`` plus dotted overrides (``train.lr=3e-5``). An option that names a file is typed
:class:`InPath` or :class:`OutPath`, which is how ``bundlerec submit`` finds the paths to resolve."""

from __future__ import annotations

import sys
from typing import Annotated, Any, Callable, Optional

import typer
import typer.core
from typer._click import exceptions as click_errors  # typer (>= 0.25) vendors click: its own exception types
from typer._click.globals import get_current_context

from bundlerec.config import ConfigError, PipelineConfig, load_config


class InPath:
    """A file or folder the stage reads (a local path, or a URI it passes on): an option's parser."""

    __name__ = "path"

    def __call__(self, value: str) -> str:
        return value


class OutPath(InPath):
    """A file or folder the stage writes: on a remote cluster it must be absolute or a URI."""

    __name__ = "output"


class ConfigPath(InPath):
    """The pipeline config of a config-driven stage (``--config`` of :data:`Config`)."""

    __name__ = "config"


class IntList:
    """Integers given as ``--folds 1 2 3``, ``--folds 1,2,3`` or ``--folds=1,2,3``: a list."""

    __name__ = "ints"

    def __call__(self, value) -> list[int]:
        if isinstance(value, list):
            return value
        return [int(x) for x in str(value).split(",") if x.strip()]  # a ValueError: click's "not a valid ints"


def _parser(p) -> Any:
    """The parser a typer parameter was declared with (None for none)."""
    return getattr(getattr(getattr(p, "type_descriptor", None), "parameter_info", None), "parser", None)


def _is_int(token: str) -> bool:
    return token.lstrip("-").isdigit() and not token.startswith("--")


class StageCommand(typer.core.TyperCommand):
    """A stage's command: an :class:`IntList` option takes every integer after it (argparse's nargs),
    so the space-separated lists of the documented commands keep working."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        lists = {o for p in self.params if isinstance(_parser(p), IntList) for o in p.opts}
        out, i = [], 0
        while i < len(args):
            out.append(args[i])
            i += 1
            if out[-1] in lists:
                vals = []
                while i < len(args) and _is_int(args[i]):
                    vals.append(args[i])
                    i += 1
                if vals:
                    out.append(",".join(vals))
        return super().parse_args(ctx, out)


def path_option(*decls: str, help: str, output: bool = False, **kw) -> Any:
    """A typer option naming a file or folder (read, or written with ``output``)."""
    kw.setdefault("metavar", "OUT" if output else "PATH")
    return typer.Option(*decls, help=help, parser=(OutPath if output else InPath)(), **kw)


def int_list_option(*decls: str, help: str, **kw) -> Any:
    """A typer option taking a list of integers (:class:`IntList`)."""
    return typer.Option(*decls, help=help, parser=IntList(), metavar="N...", **kw)


Config = Annotated[Optional[str], typer.Option("--config", help="YAML config (jobs/configs/*.yaml); defaults otherwise",
                                               parser=ConfigPath(), metavar="FILE", show_default=False)]
Overrides = Annotated[Optional[list[str]], typer.Argument(
    help="dotted overrides, e.g. train.lr=3e-5 data.history_len=20", metavar="KEY=VALUE...", show_default=False)]


def usage_error(message: str) -> Exception:
    """A usage error of the running command: click's usage line, the message, exit status 2."""
    return click_errors.UsageError(message, ctx=get_current_context(silent=True))


def load(config: Optional[str], overrides: Optional[list[str]]) -> PipelineConfig:
    """The config + overrides; a typo in a key or value is a usage error (one line, exit status 2),
    before any compute."""
    try:
        return load_config(config, list(overrides or []))
    except ConfigError as e:
        raise usage_error(str(e)) from None


def config_job(config: Optional[str], overrides: Optional[list[str]], *, ray: bool = True,
               tracking: bool = True) -> PipelineConfig:
    """The preamble every config-driven job shares: environment, config + overrides, the version
    check, the MLflow server check (before any compute is spent) and the Ray connection."""
    from bundlerec.runtime import check_versions, init_ray, setup_env
    from bundlerec.tracking import check_server, load_credentials

    setup_env()
    load_credentials()
    cfg = load(config, overrides)
    if ray:
        check_versions()
    if tracking:
        from bundlerec.tracking import TrackingError

        try:
            check_server(cfg.mlflow.tracking_uri)  # a down tracking server fails here, before Ray or compute
        except TrackingError as e:
            raise SystemExit(f"bundlerec: {e}") from None  # one clear line, exit status 1, no traceback
    if ray:
        init_ray()
    return cfg


def click_command(fn: Callable) -> typer.core.TyperCommand:
    """The click command of a stage function (what ``bundlerec`` registers and :func:`run` runs)."""
    app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)
    app.command(cls=StageCommand)(fn)
    return typer.main.get_command(app)


def run(fn: Callable, argv: list[str] | None = None) -> Any:
    """Run the stage function ``fn`` as its command on ``argv`` (default: ``sys.argv[1:]``) and
    return what it returns. A usage error prints click's message and exits with status 2; ``--help``
    prints the help and returns None."""
    name = fn.__module__
    if name == "__main__":  # python -m jobs.X
        name = "jobs." + sys.argv[0].rsplit("/", 1)[-1].removesuffix(".py")
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        rv = click_command(fn).main(args=args, prog_name=f"python -m {name}", standalone_mode=False)
    except click_errors.ClickException as e:
        e.show()
        raise SystemExit(e.exit_code) from None
    except typer.Abort:
        raise SystemExit(1) from None
    return None if isinstance(rv, int) and not isinstance(rv, bool) else rv  # an int: click's exit code (--help)


def option_paths(fn: Callable) -> tuple[dict[str, bool], bool]:
    """The options of a stage that name files ({option: written}, the pipeline config left out) and
    whether it is config-driven (takes :data:`Config`, so its outputs follow ``output_root``)."""
    params = [p for p in click_command(fn).params if isinstance(p, typer.core.TyperOption)]
    paths = {o: isinstance(_parser(p), OutPath) for p in params
             if isinstance(_parser(p), InPath) and not isinstance(_parser(p), ConfigPath) for o in p.opts}
    return paths, any(isinstance(_parser(p), ConfigPath) for p in params)
