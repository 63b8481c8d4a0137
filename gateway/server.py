"""The gateway process: `python -m gateway --listen HOST:PORT --endpoint ADDR
--model-dir DIR`. Binds its address itself (an address in use is an error at start,
exit code 2), prints `READY HOST:PORT` on stdout for the launcher, and serves with
uvicorn until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from strata.runtime import logs
from strata.transport.rpc import API_KEY_ENV


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gateway", description="Strata's OpenAI-compatible HTTP API")
    p.add_argument("--listen", default="127.0.0.1:8000", help="HOST:PORT of the HTTP API (port 0 = any free port)")
    p.add_argument("--endpoint", required=True, help="the compute node's gRPC address (host:port or unix:///path)")
    p.add_argument("--model-dir", default="", help="the served model's directory (tokenizer and chat template)")
    p.add_argument("--model-name", default="", help="the model id in /v1/models (default: the directory's name)")
    p.add_argument("--tls-ca", default="", help="PEM root certificate of a TLS compute node")
    p.add_argument("--tls-cert", default="", help="PEM certificate: serve HTTPS (with --tls-key)")
    p.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    p.add_argument("--timeout", type=float, default=600.0, help="each request's deadline in seconds (0 = none)")
    return p.parse_args(argv)


def bind(listen: str) -> socket.socket:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT only; a listener in use still fails
    sock.bind((host, int(port)))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def main(argv=None) -> int:
    a = parse_args(logs.setup_from_argv("gateway", argv))  # --log-level, --log-json as every service
    import uvicorn

    from gateway.app import GatewayConfig, create_app
    from strata.api.chat_template import ChatTemplate

    config = GatewayConfig(endpoint=a.endpoint, model_dir=a.model_dir, model_name=a.model_name,
                           api_key=os.environ.get(API_KEY_ENV, ""), tls_ca=a.tls_ca, timeout_s=a.timeout)
    template = ChatTemplate.load(a.model_dir) if a.model_dir else None
    app = create_app(config, template)
    try:
        sock = bind(a.listen)
    except (OSError, ValueError) as e:
        print(f"gateway: cannot listen on {a.listen}: {e.strerror if isinstance(e, OSError) else e}",
              file=sys.stderr, flush=True)
        return 2
    host, port = sock.getsockname()[:2]
    print(f"READY {f'[{host}]' if ':' in host else host}:{port}", flush=True)
    debug = logging.getLogger().level <= logging.DEBUG
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=debug, timeout_graceful_shutdown=3,
                                           lifespan="on",  # log_config None: uvicorn logs through strata.runtime.logs
                                           ssl_certfile=a.tls_cert or None, ssl_keyfile=a.tls_key or None))
    server.run(sockets=[sock])
    return 0
