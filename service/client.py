"""The service's Python client is the `batchsize_client` package (client/ in this repository, installed with
the service): this module re-exports it for code written against `service.client`."""

from batchsize_client import (  # noqa: F401 - re-exports
    AsyncBatchsizeClient,
    BatchsizeClient,
    BatchsizeError,
    Job,
    Recipe,
    RecommendationFailed,
    RecommendationTimeout,
    build_request,
)
from batchsize_client.client import DEFAULT_URL  # noqa: F401
