"""Old entry point: `python -m minicpmo.duplex_replay` runs `python -m minicpmo.duplex.replay`."""

from minicpmo.duplex.replay import main

if __name__ == "__main__":
    main()
