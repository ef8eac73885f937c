"""The command line of a spin: ``python -m spinmeround_lite.spin IMAGE --views 48 --out DIR [...]``.

One name, one thing: ``spinmeround_lite.spin`` is the *function* (``from spinmeround_lite import spin``); the
module that holds steps A-C, ``SpinResult``, ``ensure_spin`` and the command line is ``spinmeround_lite.spinning``.
This file exists only so that ``python -m spinmeround_lite.spin`` runs that command line; importing it as a
module would make the package's ``spin`` a module again, so it refuses and names both spellings.
"""

import sys

if __name__ == "__main__":
    from spinmeround_lite.spinning import main

    sys.exit(main())

raise ImportError("spinmeround_lite.spin is the function, not a module: use `from spinmeround_lite import spin` "
                  "for the function and `import spinmeround_lite.spinning` for the module (steps A-C, SpinResult, "
                  "ensure_spin, main)")
