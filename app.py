"""MiniCPM-o 4.5 Space: `python app.py [--model DIR|hub-id] [--host H] [--port P]`.

Without --model and without $MINICPMO_MODEL the embedded default model is served (see
minicpmo/space/model_loading.py). Limits and test switches come from environment variables
(minicpmo/space/settings.py).
"""

import argparse
import os

from minicpmo.space import SpaceSettings, build_demo, load_model


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="model folder or hub id (default: $MINICPMO_MODEL, else the embedded default model)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="ask Gradio for a public share link")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    loaded = load_model(args.model)
    demo = build_demo(loaded, SpaceSettings.from_env())
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True)
    finally:
        demo.minicpmo_live.close_all()


if __name__ == "__main__":
    main()
