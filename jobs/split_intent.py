"""Split a bundlerec_intent directory by user into train/ and eval/ (dev folds)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from bundlerec.cli import path_option, run


def command(src: Annotated[str, path_option("--src", help="a bundlerec_intent directory", show_default=False)],
            out: Annotated[str, path_option("--out", help="where train/ and eval/ go", output=True, show_default=False)],
            fold: Annotated[int, typer.Option(help="users with sha1 % 5 == fold go to eval (upstream used 0)")] = 1) -> dict:
    """Split a bundlerec_intent directory by user into train/ and eval/, for local evaluation when
    the official hold-out is not available.

    \b
    Examples (`python -m jobs.split_intent` takes the same arguments):
      bundlerec split-intent --src datasets/bundlerec_intent --out runs/intent_split --fold 1
      bundlerec eval-bundles --train-dir runs/intent_split/train --eval-dir runs/intent_split/eval --out runs/eval.json
    """
    from bundlerec.bundles.intent import split_by_user

    counts = split_by_user(src, out, fold)
    print(json.dumps(counts, indent=2))
    return counts


def main(argv: list[str] | None = None) -> dict:
    return run(command, argv)


if __name__ == "__main__":
    main()
