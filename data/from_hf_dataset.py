"""Any preference dataset that ``datasets`` loads -> the preference file ``spa prepare`` reads.

Name the columns that hold the prompt and the two answers. Each may be a plain string or a chat message
list (``[{"role": ..., "content": ...}]``): a prompt is then the first user turn, an answer the last
assistant turn, so ``--prompt-col chosen`` takes the prompt out of a conversation column.

    python data/from_hf_dataset.py Intel/orca_dpo_pairs -o runs/data/orca.parquet --prompt-col question
    python data/from_hf_dataset.py trl-lib/ultrafeedback_binarized -o runs/data/uf.parquet --prompt-col chosen
    python data/from_hf_dataset.py ./my_pairs.jsonl -o runs/data/mine.parquet

The input is a hub id (online), a ``save_to_disk`` folder, a folder of Parquet/JSON files, or one
Parquet/JSON(L)/CSV file.
"""

from __future__ import annotations

import argparse
import sys

from convert import Columns, add_common_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="hub id or local path")
    parser.add_argument("--output", "-o", required=True, help="output .parquet or .jsonl")
    parser.add_argument("--prompt-col", default="prompt", help="column of the prompt (default prompt)")
    parser.add_argument("--chosen-col", default="chosen", help="column of the preferred answer (default chosen)")
    parser.add_argument("--rejected-col", default="rejected", help="column of the other answer (default rejected)")
    parser.add_argument("--id-col", default=None, help="column of a stable prompt id (default: spa prepare hashes "
                                                      "the normalised prompt)")
    add_common_arguments(parser, default_split="train")
    args = parser.parse_args(argv)
    columns = Columns(prompt=args.prompt_col, chosen=args.chosen_col, rejected=args.rejected_col,
                      prompt_id=args.id_col)
    return run(args, lambda available: columns)


if __name__ == "__main__":
    sys.exit(main())
