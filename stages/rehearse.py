"""rehearse stage (on demand): every GPU phase of the recipe run once at its real shapes on the device present,
against the memory model and the card.

    python stages/rehearse.py --out reports/rehearse.md --metrics reports/metrics/rehearse.json --json reports/rehearse.json

Reads params.yaml's pretrain, sft, core_eval, chat_eval and tokenizer sections (the shapes) and plan.card (the
card), and the eval data the eval stages read (through their caches) for the longest prompts. Writes the table
(reports/rehearse.md), the full report (reports/rehearse.json) and flat metrics. The same code as
`python -m daychat.plan.rehearse` (= make rehearse), whose options (--tokenizer, --bundle, --chat-data, --card,
--device) pass through.
"""

from __future__ import annotations

import sys

from daychat.cli import run
from daychat.plan.rehearse import main as rehearse

NAME = "rehearse"


def main() -> None:
    rehearse(sys.argv[1:])


if __name__ == "__main__":
    run(main, NAME)
