"""`python -m dirbackup` and the `dirbackup` program: the command line.

`run` catches a Ctrl-C that comes while the program is still starting
(importing the core, parsing the arguments), before the command line's own
handling is in place: the user gets one line, not a traceback."""

import sys


def run() -> None:
    """Entry point of the `dirbackup` program."""
    try:
        from dirbackup.cli import EXIT_INTERRUPTED, main
    except KeyboardInterrupt:
        print("\nerror: interrupted", file=sys.stderr)
        sys.exit(130)
    try:
        status = main()
    except KeyboardInterrupt:  # during argument parsing, before main's own handler
        print("\nerror: interrupted", file=sys.stderr)
        status = EXIT_INTERRUPTED
    sys.exit(status)


if __name__ == "__main__":
    run()
