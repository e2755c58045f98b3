"""What the benchmarks share in writing their RESULTS files: the `## ` sections (each benchmark rewrites its own and
keeps the others as they are), and the CPU's name for the Machine line."""

from __future__ import annotations

import subprocess


def cpu_model() -> str:
    """The CPU's model name as lscpu gives it ("" where it gives none)."""
    run = subprocess.run(["sh", "-c", "lscpu | grep 'Model name' | cut -d: -f2"], capture_output=True, text=True)
    return run.stdout.strip()


def replace_section(text: str, heading: str, body: str) -> str:
    """`text` with the section that starts at the line `heading` (up to the next `## ` heading or the end)
    replaced by `body`; appended where there is none. Every other section is kept byte for byte."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, x in enumerate(lines) if x.rstrip("\n") == heading), None)
    if start is None:
        return text.rstrip("\n") + "\n\n" + body
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    rest = "".join(lines[end:])
    return "".join(lines[:start]) + body + ("\n" + rest if rest else "")


def keep_others(new: str, old: str) -> str:
    """`new` with every `## ` section of `old` that `new` does not write appended, as it was."""
    written = {line for line in new.splitlines() if line.startswith("## ")}
    for heading in (line for line in old.splitlines() if line.startswith("## ") and line not in written):
        new = replace_section(new, heading, section(old, heading))
    return new


def section(text: str, heading: str) -> str | None:
    """The section of `text` that starts at the line `heading`, up to the next `## ` heading or the end."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, x in enumerate(lines) if x.rstrip("\n") == heading), None)
    if start is None:
        return None
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "".join(lines[start:end]).rstrip("\n") + "\n"
