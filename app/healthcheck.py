"""python -m app.healthcheck: exit 0 when the local service answers GET /health with 200.

For Docker's HEALTHCHECK (the image has Python, not curl). Reads APP_PORT (default 8000).
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.healthcheck",
        description="Ask the local service for GET /health, as Docker's HEALTHCHECK does; the "
        "port is APP_PORT (default 8000).",
        epilog="exit status: 0 healthy (200), 1 unhealthy (no answer, or another status: 503 "
        "while the model loads)",
    )
    parser.parse_args(argv)
    url = f"http://127.0.0.1:{os.environ.get('APP_PORT', '8000')}/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:  # 503 arrives as HTTPError, a URLError
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
