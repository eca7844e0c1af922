"""``python -m bench.wham ARGS``: the ``wham`` command of whichever ``openwham`` is first on
``sys.path`` (``bench.load --tree DIR`` puts ``DIR/src`` there with ``PYTHONPATH``)."""

from openwham.cli.main import main

if __name__ == "__main__":
    main()
