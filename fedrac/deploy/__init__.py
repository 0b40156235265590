"""Deployment tooling: certificates, SuperNode keys, a local SuperLink + SuperNodes federation."""
