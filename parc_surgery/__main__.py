"""``python -m parc_surgery``: the ``parc-convert`` command (see :mod:`parc_surgery.cli`)."""

from .cli import main

if __name__ == "__main__":
    main()
