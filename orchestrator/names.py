"""Every name a fleet gets in Ray Serve and every URL path, derived from a model's name.

One place, because four readers must agree: the Serve builders (``orchestrator.app``), the
gateway (handles across applications, ``/fleet``'s fast-lane paths), ``slm serve`` (which
application and deployment to watch) and the Kubernetes renderer. The chart's template
repeats the lane rule in Go templates; a test holds it equal to ``lane_route_prefix``.
"""

from __future__ import annotations

import hashlib
import re

APP_NAME = "slm"  # the gateway's application (and the fleet-state and limiter actors' namespace)
APP_IMPORT_PATH = "orchestrator.app:build_app"
LANE_IMPORT_PATH = "orchestrator.app:build_lane_app"
LANE_PREFIX = "/models"
GATEWAY_DEPLOYMENT = "gateway"

# Serve deployment names allow fewer characters than a URL path segment does.
_DEPLOYMENT_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_PATH_CHARS = re.compile(r"[^A-Za-z0-9._-]")


def _slug(model_name: str, disallowed: re.Pattern[str]) -> str:
    """``model_name`` with disallowed characters replaced by ``-``; when anything was
    replaced, a short hash of the original keeps distinct names distinct."""
    safe = disallowed.sub("-", model_name)
    if safe != model_name:
        safe += "-" + hashlib.sha1(model_name.encode()).hexdigest()[:6]
    return safe


def deployment_name(model_name: str) -> str:
    """The Serve deployment of a model's replicas."""
    return f"model-{_slug(model_name, _DEPLOYMENT_CHARS)}"


def lane_slug(model_name: str) -> str:
    """The URL path segment of a model's fast lane (model names may hold ``/`` and ``:``)."""
    return _slug(model_name, _PATH_CHARS)


def lane_app_name(model_name: str) -> str:
    """The Serve application of a fast-lane model (its replicas are that application's ingress)."""
    return f"{APP_NAME}-lane-{lane_slug(model_name)}"


def lane_route_prefix(model_name: str) -> str:
    """Where a model's fast lane answers: ``<prefix>/v1/chat/completions`` and so on."""
    return f"{LANE_PREFIX}/{lane_slug(model_name)}"


def model_app(model_name: str, fast_lane: bool) -> str:
    """The Serve application a model's deployment lives in."""
    return lane_app_name(model_name) if fast_lane else APP_NAME
