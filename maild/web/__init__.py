"""maild's web face ([web]): consent pages, RFC 8058 one-click unsubscribe, /metrics."""
