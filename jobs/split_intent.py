"""Split a bundlerec_intent directory by user into train/ and eval/ (for local evaluation when the
official hold-out is not available):

    python -m jobs.split_intent --src datasets/bundlerec_intent --out runs/intent_split --fold 1
    python -m jobs.eval_bundles --train-dir runs/intent_split/train --eval-dir runs/intent_split/eval --out ...
"""

from __future__ import annotations

import argparse
import json

from bundlerec.bundles.intent import split_by_user


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--fold", type=int, default=1, help="users with sha1 % 5 == fold go to eval (upstream used 0)")
    args = p.parse_args(argv)
    counts = split_by_user(args.src, args.out, args.fold)
    print(json.dumps(counts, indent=2))
    return counts


if __name__ == "__main__":
    main()
