"""The admin HTTP server of a broker: Prometheus ``/metrics``, a JSON API and a dashboard.

``arrival serve --http 127.0.0.1:7712`` runs it next to the broker; for an embedded
broker, ``AdminServer(broker, "127.0.0.1:7712").start()``. docs/operations.md covers
the metrics, the API, the dashboard and how to keep it private.
"""

from arrival.admin.http import DEFAULT_HTTP, AdminServer, parse_address
from arrival.admin.metrics import ArrivalCollector, registry_for

__all__ = ["DEFAULT_HTTP", "AdminServer", "ArrivalCollector", "parse_address", "registry_for"]
