"""`python -m minicpmo.serve --model DIR`: the realtime WebSocket server (ws://HOST:PORT/v1/realtime, GET /health)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minicpmo.serve", description=__doc__)
    parser.add_argument("--model", default=None, help="a saved folder or hub id (default: the embedded demo model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-sessions", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=None,
                        help="most sessions per engine step (default: all with a unit ready; 1: one by one)")
    args = parser.parse_args(argv)

    import uvicorn

    from ..space.model_loading import load_model
    from ..voices import read_audio_16k
    from .realtime import create_app

    loaded = load_model(args.model)
    voice = read_audio_16k(loaded.model_voice) if loaded.model_voice else None
    app = create_app(loaded.model, loaded.processor, voice_audio=voice, name=loaded.name,
                     max_sessions=args.max_sessions, max_batch=args.max_batch)
    uvicorn.run(app, host=args.host, port=args.port, ws_max_size=8 * 1024 * 1024)


if __name__ == "__main__":
    main()
