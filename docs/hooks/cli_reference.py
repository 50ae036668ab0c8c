"""mkdocs hook: the command-line reference, generated from the entry scripts' parser
(common/core/config.build_parser) wherever a page says <!-- cli-reference -->, so the
docs list exactly the flags the scripts accept, with their defaults."""

import argparse
import os
import sys

MARKER = "<!-- cli-reference -->"


def on_page_markdown(markdown, page, config, files):
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, reference(os.path.dirname(config.config_file_path)))


def reference(repository: str) -> str:
    sys.path.insert(0, repository)
    from common.core.config import build_parser

    parser = build_parser("train_torch/main.py")
    lines = []
    for group in parser._action_groups:  # argparse has no public list of its groups
        actions = [action for action in group._group_actions if action.option_strings and action.dest != "help"]
        if not actions:
            continue
        lines += ["", f"**{group.title}**" if group.title not in ("options", "optional arguments") else "", "",
                  "| flag | default | what it does |", "|---|---|---|"]
        lines += [row(action) for action in actions]
    return "\n".join(line for line in lines).strip() + "\n"


def row(action: argparse.Action) -> str:
    flags = ", ".join(f"`{flag}`" for flag in action.option_strings)
    if action.choices:
        flags += " " + "\\|".join(f"`{choice}`" for choice in action.choices)
    default = "–" if action.default in ("", None) else f"`{action.default}`"
    text = (action.help or "").replace("|", "\\|").replace("\n", " ")
    return f"| {flags} | {default} | {text} |"
