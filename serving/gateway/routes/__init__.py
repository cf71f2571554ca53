"""The gateway's HTTP routes, one router per concern; ``serving.gateway.app`` includes them."""
