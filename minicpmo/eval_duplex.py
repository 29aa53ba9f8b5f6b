"""Old entry point: `python -m minicpmo.eval_duplex` runs `python -m minicpmo.duplex.evaluate`."""

from minicpmo.duplex.evaluate import main

if __name__ == "__main__":
    main()
