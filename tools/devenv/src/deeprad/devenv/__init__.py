"""Test and development infrastructure: real Kubernetes control planes, a node agent, S3 and
Prometheus on loopback, without containers. Not part of the product."""
