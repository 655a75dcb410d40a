"""UltraFeedback binarized (HuggingFaceH4/ultrafeedback_binarized) -> the preference file ``spa prepare`` reads.

The source has ``prompt`` (a string), ``prompt_id``, ``chosen``/``rejected`` (message lists: the user turn,
then the assistant's answer) and ``score_chosen``/``score_rejected``; the preference splits are
``train_prefs`` (about 61K rows: the seed, prompt sets and held-out pairs come from it) and ``test_prefs``.
The output keeps ``prompt_id``, the prompt, the two answers as strings and both scores (each when present:
only ``prompt``, ``chosen`` and ``rejected`` are required).

    python data/prepare_ultrafeedback.py                                   # hub (online), train_prefs
    python data/prepare_ultrafeedback.py /data/ultrafeedback_binarized     # a local copy, offline
    python data/prepare_ultrafeedback.py --tokenizer models/zephyr-7b-sft-full   # fit model.max_length 1024

A local copy is a ``save_to_disk`` folder, a folder with the hub's Parquet files
(``hf download HuggingFaceH4/ultrafeedback_binarized --repo-type dataset --local-dir DIR``), or one
Parquet/JSONL file of a split.
"""

from __future__ import annotations

import argparse
import sys

from convert import Columns, add_common_arguments, run

HUB_ID = "HuggingFaceH4/ultrafeedback_binarized"
SCORES = ("score_chosen", "score_rejected")


def columns_for(available: list[str]) -> Columns:
    # optional columns are used when present (a hand-made copy may lack prompt_id: spa prepare then hashes
    # the prompt); prompt, chosen and rejected are required
    return Columns(prompt_id="prompt_id" if "prompt_id" in available else None,
                   scores=tuple(c for c in SCORES if c in available))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", nargs="?", default=HUB_ID, help=f"hub id or local path (default {HUB_ID})")
    parser.add_argument("--output", "-o", default=None,
                        help="output .parquet or .jsonl (default runs/data/ultrafeedback_<split>.parquet)")
    add_common_arguments(parser, default_split="train_prefs")
    args = parser.parse_args(argv)
    args.output = args.output or f"runs/data/ultrafeedback_{args.split}.parquet"
    return run(args, columns_for)


if __name__ == "__main__":
    sys.exit(main())
