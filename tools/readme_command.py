"""Prints one of the README's two set-up commands, found by its marker comment.

    python3 tools/readme_command.py demo    # installs and runs the main demo
    python3 tools/readme_command.py tests   # installs and runs the test suite

`.ci/run` runs the `tests` command, so CI tests exactly what the README tells a new user.
Standard library only: it runs before anything is installed.
"""

import pathlib
import re
import sys

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def command(name: str, text: str | None = None) -> str:
  text = README.read_text() if text is None else text
  found = re.search(rf"<!-- command: {name} -->\s*```bash\n(.*?)```", text, re.DOTALL)
  if found is None:
    raise SystemExit(f"README.md has no block marked '<!-- command: {name} -->'")
  return " ".join(line.rstrip("\\").strip() for line in found.group(1).strip().splitlines())


if __name__ == "__main__":
  print(command(sys.argv[1]))
