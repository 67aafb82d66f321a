"""The Ray Serve application: fine-tuned heads online, many models on one deployment.

``build_app`` (import path ``earthray.serve.app:build_app``) is an application builder taking the ``args``
of a Serve config file (``earthray.serve.config.AppArgs``). It binds two deployments:

- ``Gateway`` (``earthray.serve.gateway``): the FastAPI ingress: auth, limits, decoding, checks,
  normalisation, answers;
- ``ModelServer`` (``earthray.serve.host``): the models, multiplexed and batched.

Where the rest lives: ``config`` (args, config files), ``models`` (the served models, verified),
``limits`` (slots, memory, body reading), ``decode`` (request bodies), ``answers`` (JSON / GeoTIFF),
``schemas`` (OpenAPI), ``run`` (``earthray serve``); shared with batch inference in ``infer``: ``inputs``
(the input contract, numpy only) and ``predictor`` (the model).

Building the app does no I/O (``serve build``, config checks work offline). Each gateway replica verifies
the models when it starts, resolving ``models:/landcover@champion`` to the version the alias names then;
that version is what its requests are served by (redeploy to follow the alias).
"""

from __future__ import annotations

from typing import Any

from ray import serve

from earthray.serve.config import AppArgs, load_serve_config, parse_args
from earthray.serve.gateway import Gateway
from earthray.serve.host import ModelServer
from earthray.serve.run import run_config

__all__ = ["AppArgs", "build_app", "load_serve_config", "run_config"]


def build_app(args: dict[str, Any] | AppArgs) -> serve.Application:
    """The application for ``import_path: earthray.serve.app:build_app``.

    A plain ``auth_token`` is replaced by its sha256 here, so the deployments' arguments never hold it.
    The Gateway's ``max_ongoing_requests`` (and its queue at the proxy) default to ``max_requests`` plus
    room for probes; a config file's ``deployments:`` entries override these options as usual.
    """
    parsed = parse_args(args).hashed()
    plain = parsed.model_dump(exclude_none=True)
    backpressure = {"retry_after_s": parsed.retry_after_s}
    host = ModelServer.options(max_ongoing_requests=parsed.max_ongoing_requests,
                               max_queued_requests=parsed.max_queued_requests,
                               backpressure_config=backpressure).bind(plain)
    # The proxy queues requests for a gateway replica while it probes the replica's load: a queue as deep as
    # the gateway's slots keeps that brief wait from turning into Serve's plain-text 503s.
    return Gateway.options(max_ongoing_requests=parsed.gateway_slots, max_queued_requests=parsed.gateway_slots,
                           backpressure_config=backpressure).bind(host, plain)
