"""Names the sidecar and Envoy's bootstrap share: headers the sidecar sets for Envoy
(route choice, ratelimit descriptors; a client's copies are stripped, and Envoy removes
them before the request goes upstream) and the dynamic-metadata namespace."""

# Namespace the sidecar writes dynamic metadata into; Envoy drops any other.
METADATA_NAMESPACE = "ai_gateway"

INTERNAL_HEADER_PREFIX = "x-ai-gateway-"
PROVIDER_HEADER = "x-ai-gateway-provider"
CONSUMER_HEADER = "x-ai-gateway-consumer"
MODEL_HEADER = "x-ai-gateway-model"
# Set with PROVIDER_HEADER when the request was translated to the provider's API: its
# dispatch route matches any path (the sidecar set the whole upstream path).
TRANSLATED_HEADER = "x-ai-gateway-translated"
# Set by the sidecar on a request whose response body is metered off the latency path:
# the random token that joins the observing ext_proc stream to its exchange.
EXCHANGE_HEADER = "x-ai-gateway-exchange"
INTERNAL_HEADERS = (
    PROVIDER_HEADER,
    CONSUMER_HEADER,
    MODEL_HEADER,
    TRANSLATED_HEADER,
    EXCHANGE_HEADER,
)
# gRPC metadata on the observing filter's calls: the sidecar tells its streams apart.
OBSERVER_METADATA = "x-ai-gateway-observer"
